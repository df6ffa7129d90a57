"""edgellm as a service on a board: the OpenAI-compatible HTTP server (`server/`, the `serve` extra),
and the systemd unit rendered for a board and a bundle (`options.py`, `unit.py`)."""
