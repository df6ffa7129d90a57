"""The one decode loop and what feeds it: prompts to ids (`tokenizer.py`, `chat_template.py` with its
sandbox), the loop (`generation.py`), sampling, streamed UTF-8 text and stop strings (`streaming.py`),
and multi-turn chat (`chat.py`)."""
