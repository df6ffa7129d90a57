"""The host half of the arm64 smoke test (boards/arm64/smoke.sh runs it with the repo's venv).

Exports a tiny random llama (tests/tiny_models.py) to OUT/bundle, generates greedily with the
native engine and with ONNX Runtime on this machine, and writes OUT/expected.json: the prompt, its
ids and the tokens that guest_check.py must reproduce on every emulated arm64 core. The two
backends must already agree here, or the board comparison would prove nothing.

Needs the development install (torch, transformers, the export extra) and the native extension.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests"))

from guest_check import BACKENDS, greedy_tokens  # noqa: E402

# Seed 0 of the tiny llama repeats one token whatever the prompt; seed 2 on this prompt gives
# 8 distinct tokens in 12, so a wrong step anywhere in the decode loop shows.
PROMPT = "Hello world! How are you"
SEED = 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for bundle/ and expected.json")
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from tiny_models import make_tiny_model, save_tiny_model

    from edgellm.backends.native import ffi as native
    from edgellm.export.exporter import export_model

    if not native.available():
        print(f"error: {native.unavailable_reason()}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    bundle = args.out / "bundle"
    with tempfile.TemporaryDirectory() as hf_folder:
        save_tiny_model(make_tiny_model("llama", tie=True, seed=SEED), Path(hf_folder))
        export_model(hf_folder, bundle)

    runs = {backend: greedy_tokens(bundle, backend, PROMPT, args.max_tokens, args.threads) for backend in BACKENDS}
    # the Arm cores with SDOT run the native products on 8-bit activations: the host's run in 8 bits is theirs,
    # bit for bit (every kernel variant gives the reference's bits)
    os.environ["EDGELLM_ACTIVATIONS"] = "8"
    try:
        runs["native 8-bit"] = greedy_tokens(bundle, "native", PROMPT, args.max_tokens, args.threads)
    finally:
        del os.environ["EDGELLM_ACTIVATIONS"]
    expected = {
        "prompt": PROMPT,
        "max_tokens": args.max_tokens,
        "prompt_ids": runs["native"]["prompt_ids"],
        "tokens": runs["native"]["tokens"],
        "tokens_8bit": runs["native 8-bit"]["tokens"],
        "host_kernel_variant": native.kernel_variant(),
    }
    print(json.dumps({"host": runs, "host_kernel_variant": expected["host_kernel_variant"]}))
    tokens = expected["tokens"]
    if any(
        len(t) != args.max_tokens or len(set(t)) < 2 for t in (tokens, expected["tokens_8bit"])
    ):  # an empty or stuck reference would match anything alike
        print(
            f"error: the host's greedy answer is not {args.max_tokens} tokens with at least two distinct ones: "
            f"{tokens} (8-bit activations: {expected['tokens_8bit']})",
            file=sys.stderr,
        )
        return 1
    if runs["onnxruntime"]["tokens"] != expected["tokens"]:
        print(
            f"error: on the host the backends disagree: native {expected['tokens']}, "
            f"onnxruntime {runs['onnxruntime']['tokens']}",
            file=sys.stderr,
        )
        return 1
    (args.out / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
