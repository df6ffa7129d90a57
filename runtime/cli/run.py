"""`edgellm run` and `edgellm chat`: terminal front ends over Model.stream."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from edgellm.bundle.format import FORMAT_VERSION, MANIFEST_FILE
from edgellm.cli.export import require_export_extras
from edgellm.cli.options import MAX_TOKENS, RUNTIME_OPTIONS, SAMPLING_OPTIONS, STATS, STOP, SYSTEM, with_options
from edgellm.default_model import default_bundle_dir
from edgellm.errors import EdgeLLMError, InvalidSettingError
from edgellm.generate.generation import Chunk
from edgellm.generate.sampling import SamplingParams
from edgellm.generate.tokenizer import INVALID_TEXT_HINT, check_text
from edgellm.model import Model
from edgellm.settings import RuntimeSettings


def _format_version(bundle: Path):
    """The format_version a bundle's manifest records; None when there is no readable manifest."""
    try:
        return json.loads((bundle / MANIFEST_FILE).read_text(encoding="utf-8")).get("format_version")
    except (OSError, ValueError, AttributeError):
        return None


def ensure_default_bundle() -> Path:
    """The default model's bundle, exported into the cache folder on first use."""
    bundle = default_bundle_dir()
    version = _format_version(bundle)
    if version == FORMAT_VERSION:
        return bundle

    require_export_extras()
    if version is None:
        print(f"first use: exporting the default model to {bundle}", file=sys.stderr)
    else:  # a bundle an older (or newer) edgellm wrote into the cache
        print(
            f"the cached default model is bundle format {version}, this edgellm reads {FORMAT_VERSION}: "
            f"exporting it again to {bundle}",
            file=sys.stderr,
        )
    bundle.parent.mkdir(parents=True, exist_ok=True)
    # In a child process, so that the exporter's memory (float weights for verification) is not
    # counted in this process's resident set for the rest of its life. It runs in the cache folder:
    # `python -m` puts its working directory first on sys.path, and a folder named edgellm/ where the
    # user happens to be would shadow an editable install of the package.
    done = subprocess.run(
        [sys.executable, "-m", "edgellm", "export", "default", "-o", str(bundle), "--force"],
        stdout=subprocess.DEVNULL,
        cwd=bundle.parent,
    )
    if done.returncode != 0:
        raise EdgeLLMError("exporting the default model failed (see the message above)")
    return bundle


def open_model(bundle: str | None, **settings: Any):
    path = Path(bundle) if bundle else ensure_default_bundle()
    return Model.load(path, RuntimeSettings.resolve(**settings))


def sampling_from_flags(**flags: Any) -> SamplingParams:
    return SamplingParams().with_overrides(**{k: v for k, v in flags.items() if v is not None})


@contextmanager
def cancel_on_interrupt() -> Iterator[threading.Event]:
    """The first Ctrl-C ends the generation after the current token (output so far is kept);
    a second one interrupts for real."""
    cancel = threading.Event()

    def handler(signum, frame):
        if cancel.is_set():
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        cancel.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, previous)


def print_chunks(chunks: Iterator[Chunk], as_json: bool, show_stats: bool) -> Chunk | None:
    last = None
    for chunk in chunks:
        last = chunk
        if as_json:
            record = {"text": chunk.text, "token": chunk.token_id, "finish_reason": chunk.finish_reason}
            if chunk.stats is not None:
                record["stats"] = chunk.stats.to_dict()
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            sys.stdout.write(chunk.text)
        sys.stdout.flush()
    if not as_json:
        sys.stdout.write("\n")
    if show_stats and last is not None and last.stats is not None:
        s = last.stats
        print(
            f"[{last.finish_reason}] prompt {s.prompt_tokens} tok ({s.cached_tokens} cached), "
            f"generated {s.generated_tokens} tok, first token {s.time_to_first_token * 1000:.0f} ms, "
            f"prefill {s.prefill_tokens_per_second:.1f} tok/s, decode {s.decode_tokens_per_second:.1f} tok/s, "
            f"load {s.load_seconds:.2f} s, peak RSS {s.peak_rss_bytes / 2**20:.0f} MiB",
            file=sys.stderr,
        )
    return last


def split_run_args(args: Sequence[str]) -> tuple[str | None, str]:
    if len(args) == 1:
        return None, args[0]
    if len(args) == 2:
        return args[0], args[1]
    raise InvalidSettingError("usage: edgellm run [BUNDLE] PROMPT", "quote the prompt; use - to read it from stdin")


def read_prompt(prompt: str) -> str:
    """The prompt argument, or standard input's bytes for "-", as text; invalid UTF-8 is an error."""
    if prompt != "-":
        return check_text(prompt)
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidSettingError(
            f"standard input is not valid UTF-8 (byte {error.start}: {data[error.start]:#04x})", INVALID_TEXT_HINT
        ) from None


@with_options(settings=RUNTIME_OPTIONS, sampling=SAMPLING_OPTIONS)
def run_prompt(
    args: list[str] = typer.Argument(
        ..., metavar="[BUNDLE] PROMPT", help="Bundle folder (optional) and prompt ('-': stdin)."
    ),
    chat: bool | None = typer.Option(
        None, "--chat/--raw", help="Wrap the prompt in the chat template (default when the bundle has one)."
    ),
    parse_special: bool = typer.Option(
        False,
        "--parse-special",
        help="With --raw: text that spells a control token (<|im_start|>) is that token, not plain text.",
    ),
    system: str | None = SYSTEM,
    max_tokens: int = MAX_TOKENS,
    stop: list[str] = STOP,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per chunk."),
    show_stats: bool = STATS,
    settings: dict | None = None,
    sampling: dict | None = None,
) -> None:
    """Stream the answer to a prompt. Without a bundle, uses SmolLM2-135M-Instruct (exported on first use)."""
    bundle, prompt = split_run_args(args)
    prompt = read_prompt(prompt)
    for text, what in [(system or "", "--system"), *((s, "--stop") for s in stop)]:
        check_text(text, what)
    params = sampling_from_flags(**sampling)
    model = open_model(bundle, **settings)
    use_chat = bool(model.chat_template) if chat is None else chat
    if use_chat and parse_special:
        raise InvalidSettingError("--parse-special applies to raw prompts", "add --raw")
    if use_chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        prompt_ids = model.encode_chat(messages)
    else:
        if system:
            raise InvalidSettingError("--system needs chat mode", "drop --raw or --system")
        prompt_ids = model.encode(prompt, parse_special=parse_special)
    with cancel_on_interrupt() as cancel:
        print_chunks(
            model.stream(prompt_ids, max_tokens=max_tokens, stop=stop, sampling=params, cancel=cancel),
            as_json,
            show_stats,
        )


HELP = "commands: /reset (forget the conversation), /exit (or Ctrl-D); Ctrl-C stops a reply"


@with_options(settings=RUNTIME_OPTIONS, sampling=SAMPLING_OPTIONS)
def chat_loop(
    bundle: str | None = typer.Argument(None, help="Bundle folder (default: SmolLM2-135M-Instruct)."),
    system: str | None = SYSTEM,
    max_tokens: int = MAX_TOKENS,
    stop: list[str] = STOP,
    show_stats: bool = STATS,
    settings: dict | None = None,
    sampling: dict | None = None,
) -> None:
    """Interactive multi-turn chat in the terminal (/reset, /exit)."""
    params = sampling_from_flags(**sampling)
    model = open_model(bundle, **settings)
    session = model.chat_session(system, max_tokens=max_tokens, stop=stop, sampling=params)
    name = model.manifest.name or model.config.architecture
    print(f"{name} ({model.context_length}-token context). {HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        except UnicodeDecodeError:  # the terminal sent bytes that are not UTF-8: this line is lost, the chat is not
            print(f"error: that line is not valid UTF-8 text ({INVALID_TEXT_HINT})", file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(HELP, file=sys.stderr)
            continue
        try:
            with cancel_on_interrupt() as cancel:
                print_chunks(session.send(text, cancel=cancel), False, show_stats)
        except EdgeLLMError as error:  # a turn that does not fit: report, keep the session
            print(f"error: {error}", file=sys.stderr)
        if session.dropped_turns:
            print(f"(context full: {session.dropped_turns} oldest turn(s) dropped so far)", file=sys.stderr)
