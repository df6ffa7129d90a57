"""Command-line options that several commands take, or that a command hands on as one group, each
declared once with its default taken from the dataclass that owns it.

A command decorated with `with_options(name=TABLE, ...)` gets the table's options added to its signature
(typer reads the signature) and receives them as one dict `name`, keyed by the table's targets and
holding only the options given: None means "not given", and the layer that owns the setting decides
(flags > EDGELLM_* environment > board profile > defaults, for the runtime's settings)."""

from __future__ import annotations

import functools
import inspect
from typing import Any, NamedTuple

import typer

from edgellm.export.options import ExportOptions, NpuOptions, QuantOptions
from edgellm.service.server.config import ServerConfig
from edgellm.units import format_bytes


class Flag(NamedTuple):
    annotation: Any
    target: str | None  # the name the receiving code knows it by; None: the option's own name
    option: Any  # typer's OptionInfo


def flag(names: str, help: str, default: Any = None, kind: Any = None, target: str | None = None) -> Flag:
    """An option of a group, of type `kind` (default: the default's type). A default of None means "not
    given": the option is left out of the group's dict and the layer that owns the setting decides."""
    return Flag((kind or type(default)) | None, target, typer.Option(default, *names.split(), help=help))


RUNTIME_OPTIONS = {
    "threads": flag("--threads", "CPU threads (default: one per core).", kind=int),
    "context": flag(
        "--context", "Context length in tokens (default: min(trained, 2048)).", kind=int, target="context_length"
    ),
    "max_memory": flag("--max-memory", "Refuse to load beyond this much memory, e.g. 512M, 2G.", kind=str),
    "backend": flag(
        "--backend",
        "Engine: auto (native when built, else onnxruntime), native, onnxruntime, or npu "
        "(the bundle's NPU graphs on QNN; needs onnxruntime-qnn).",
        kind=str,
    ),
    "verify_weights": flag("--verify-weights/--no-verify-weights", "Hash weights.bin at load.", kind=bool),
    "board": flag(
        "--board",
        "Board profile for the defaults: a name (see `edgellm doctor`), a .toml file, or "
        "'none' (default: the detected board; env EDGELLM_BOARD).",
        kind=str,
    ),
}
SAMPLING_OPTIONS = {
    "temperature": flag("--temperature", "0 = greedy. Default 0.8.", kind=float),
    "top_k": flag("--top-k", "Keep the k most likely tokens (0 = off). Default 40.", kind=int),
    "top_p": flag("--top-p", "Nucleus sampling (1 = off). Default 0.95.", kind=float),
    "min_p": flag("--min-p", "Drop tokens below min_p x the top probability. Default 0.05.", kind=float),
    "repeat_penalty": flag(
        "--repeat-penalty",
        "Repetition penalty over the last 64 tokens (1 = off).",
        kind=float,
        target="repetition_penalty",
    ),
    "presence_penalty": flag("--presence-penalty", "OpenAI presence penalty, -2..2.", kind=float),
    "frequency_penalty": flag("--frequency-penalty", "OpenAI frequency penalty, -2..2.", kind=float),
    "seed": flag("--seed", "Same seed and settings give the same tokens.", kind=int),
}
QUANT_OPTIONS = {
    "bits": flag("--bits", "Bits for float matrices: 4 or 8 (GGUF 4/8-bit blocks are kept).", QuantOptions.bits),
    "block": flag("--block", "Values per block: 16, 32, 64 or 128.", QuantOptions.block),
    "symmetric": flag(
        "--symmetric/--no-symmetric", "int4 with an implied zero point, not scale + minimum.", QuantOptions.symmetric
    ),
    "keep_8bit": flag(
        "--keep-8bit",
        "Tensor names or fnmatch patterns kept at 8 bits (repeatable).",
        list(QuantOptions().keep_8bit),
        list[str],
    ),
}
EXPORT_OPTIONS = {
    "verify": flag("--verify/--no-verify", "Check ONNX Runtime against the reference.", ExportOptions.verify),
    "force": flag("--force", "Replace an existing bundle.", ExportOptions.force),
    "profile": flag(
        "--profile", "cpu, or npu: also static-shape QDQ graphs for a Hexagon NPU (QNN).", ExportOptions.profile
    ),
}
NPU_OPTIONS = {
    "npu_chunk": flag("--npu-chunk", "npu profile: tokens per prefill call.", NpuOptions.chunk, target="chunk"),
    "npu_context": flag("--npu-context", "npu profile: the fixed context.", NpuOptions.context, target="context"),
    "npu_quant": flag("--npu-quant", "npu profile: a16w8 or a16w4 (weight bits).", NpuOptions.quant, target="quant"),
}
SERVER_OPTIONS = {
    "host": flag("--host", "Address to listen on; 0.0.0.0 opens it to the network.", ServerConfig.host),
    "port": flag("--port", "TCP port.", ServerConfig.port),
    "max_queue": flag(
        "--max-queue", "Requests that may wait while one generates; more get 429.", ServerConfig.max_queue
    ),
    "timeout": flag("--timeout", "Seconds per request, from arrival to the last token.", ServerConfig.timeout),
    "grace": flag("--grace", "Seconds admitted requests get to finish after SIGTERM.", ServerConfig.grace),
    "read_timeout": flag(
        "--read-timeout",
        "Seconds a connection has to send a whole request; slower ones are closed.",
        ServerConfig.read_timeout,
    ),
    "max_connections": flag(
        "--max-connections",
        "Open connections; past it, a new one evicts the oldest idle one.",
        ServerConfig.max_connections,
    ),
    "model_name": flag("--model-name", "The model id clients send (default: the bundle folder's name).", kind=str),
}
SERVICE_OPTIONS = {
    "host": flag("--host", "Address to listen on.", kind=str),
    "port": flag("--port", "TCP port.", kind=int),
    "api_key_file": flag("--api-key-file", "Key file, handed over as a credential.", kind=str),
    "max_queue": flag("--max-queue", "Requests that may wait.", kind=int),
    "timeout": flag("--timeout", "Seconds per request.", kind=float),
    "grace": flag("--grace", "Seconds to drain on stop.", kind=float),
    "memory_max": flag("--memory-max", "MemoryMax= (default: the estimate + headroom).", kind=str),
    "cpu_affinity": flag("--cpu-affinity", "CPUAffinity=, e.g. 4-7.", kind=str),
    "threads": RUNTIME_OPTIONS["threads"],
    "context": RUNTIME_OPTIONS["context"]._replace(target=None),
    "backend": RUNTIME_OPTIONS["backend"],
}
MAX_BODY = typer.Option(format_bytes(ServerConfig.max_body_bytes), "--max-body", help="Largest request body, e.g. 1M.")

# The generation options `run` and `chat` share.
MAX_TOKENS = typer.Option(256, "--max-tokens", "-n", help="Most tokens to generate.")
STOP = typer.Option([], "--stop", help="Stop string (repeatable); never printed.")
STATS = typer.Option(False, "--stats", help="Print timing and memory stats to stderr at the end.")
SYSTEM = typer.Option(None, "--system", help="System prompt (chat mode).")


def with_options(**groups: dict[str, Flag]):
    """Add each group's options to a command's signature; the command receives each group as one dict
    of the options given, keyed by their targets."""

    def decorate(command):
        signature = inspect.signature(command)
        own = [p for p in signature.parameters.values() if p.name not in groups]
        added = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=f.option, annotation=f.annotation)
            for group in groups.values()
            for name, f in group.items()
        ]

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            for group_name, group in groups.items():
                values = {f.target or name: kwargs.pop(name) for name, f in group.items()}
                kwargs[group_name] = {k: v for k, v in values.items() if v is not None}
            return command(*args, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=own + added)
        return wrapper

    return decorate
