"""Device descriptions shipped with the runtime as package data (`edgellm.boards`).

profiles/*.toml: one board per file (see boards/README.md for the fields); systemd/edgellm.service.in:
the service's unit template. The code that reads them lives in the runtime (edgellm.boards.profile,
edgellm.boards.detect, edgellm.service.unit); this package holds no code, only the files' location.
"""

from pathlib import Path

DATA = Path(__file__).resolve().parent
PROFILES = DATA / "profiles"
UNIT_TEMPLATE = DATA / "systemd" / "edgellm.service.in"
