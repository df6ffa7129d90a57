"""The static-shape NPU graphs: `host.py` feeds them (embedding, masks, the fixed KV cache) whichever
provider runs them, `session.py` opens them on Qualcomm's HTP through ONNX Runtime's QNN provider,
`backend.py` is the Backend over both."""
