"""Engines that run a bundle's decoder over a KV cache, all behind `base.Backend`: the native C engine
(`native/`), ONNX Runtime on the CPU (`onnxruntime.py`) and the NPU graphs (`npu/`); `registry.py`
picks one for the settings, `memory.py` sizes it before it loads, `placement.py` pins its threads."""
