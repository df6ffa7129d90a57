"""The bundle format, read: the files' names and alignment (`format.py`), the checked manifest
(`manifest.py`), the model's hyper-parameters and tensor shapes (`model_config.py`), the block
quantization formats (`quant_formats.py`) and weights.bin mapped in place (`weights.py`)."""
