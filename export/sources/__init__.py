"""Model sources read into the canonical model: GGUF files (`gguf.py`, with its metadata and the
tokenizer rebuilt from it) and Hugging Face folders (`hf.py`, with its tokenizer files)."""
