"""The `edgellm` command line (`app.py`) and its commands: run and chat, export, info, doctor, bench."""
