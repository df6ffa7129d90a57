"""The HTTP service: an OpenAI-compatible streaming server that runs one model under systemd.

  config.py         ServerConfig (host, port, queue, timeouts, API key), validated once
  openai_schema.py  the request bodies (pydantic) and the OpenAI-shaped error body
  queue.py          bounded admission in front of the one decode loop, run by one worker task
  metrics.py        counters, gauges and histograms in Prometheus' text format
  systemd.py        sd_notify (READY, WATCHDOG, STOPPING, STATUS) over $NOTIFY_SOCKET
  app.py            the FastAPI app: routes, middleware (API key, body limit, request log)
  serve.py          uvicorn, SIGTERM drain, exit codes: what `edgellm serve` runs

Generation goes through `Model.astream` (each step in a worker thread), so the event loop never
waits on the model. Needs the `serve` extra (fastapi, uvicorn); nothing else in edgellm imports it.
"""

from .config import ServerConfig, resolve_api_key

__all__ = ["ServerConfig", "resolve_api_key"]
