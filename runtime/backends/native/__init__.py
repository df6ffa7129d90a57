"""The native C engine: `ffi.py` is the one module that calls the C library through cffi, `backend.py`
runs a bundle on it."""
