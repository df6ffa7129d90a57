"""Verification before a bundle is written: the CPU graph through the runtime's own ONNX Runtime backend
(`cpu.py`) and the NPU graphs through the runtime's NPU host (`npu.py`), against the numpy reference."""
