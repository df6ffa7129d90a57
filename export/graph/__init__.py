"""ONNX graph builders: the CPU decoder with its KV cache (`cpu.py`) and the static-shape NPU graphs
(`npu.py`)."""
