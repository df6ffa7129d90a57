"""Quantization at export: the block formats' numpy math (`formats.py`), what to quantize and the error
it causes (`quantize.py`), and the NPU graphs' QDQ calibration (`npu.py`)."""
