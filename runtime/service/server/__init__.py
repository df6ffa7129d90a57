"""The HTTP service: an OpenAI-compatible streaming server that runs one model under systemd.

  config.py         ServerConfig (host, port, queue, timeouts, API key), validated once
  connections.py    the read deadline per request and the connection cap (uvicorn's HTTP protocol)
  openai_schema.py  the request bodies (pydantic) and the OpenAI-shaped error body
  queue.py          bounded admission in front of the one decode loop, run by one worker task
  metrics.py        counters, gauges and histograms in Prometheus' text format
  middleware.py     the request log, the API key, the body size limit (plain ASGI)
  sd_notify.py      sd_notify (READY, WATCHDOG, STOPPING, STATUS) over $NOTIFY_SOCKET
  app.py            the FastAPI app: routes and the state shared between requests
  serve.py          uvicorn, SIGTERM drain, exit codes: what `edgellm serve` runs

Generation goes through `Model.astream` (each step in a worker thread), so the event loop never
waits on the model. Needs the `serve` extra (fastapi, uvicorn); nothing else in edgellm imports it.
"""
