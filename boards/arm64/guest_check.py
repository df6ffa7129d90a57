"""The board half of the arm64 smoke test (boards/arm64/smoke.sh runs it in the arm64 chroot).

Loads the bundle with each backend, generates greedily and compares the tokens with the ones the
host wrote in expected.json; checks the kernel variant the native engine chose, and that the
CPU's features as /proc/cpuinfo lists them agree with what the kernels detected (getauxval).
Prints one JSON object and exits 1 on any mismatch.

Only the lean board runtime may be imported here: edgellm and numpy (no torch, transformers,
onnx); host_reference.py reuses `greedy_tokens` so that host and board run the same code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

BACKENDS = ("native", "onnxruntime")
# kernel variant -> the /proc/cpuinfo feature it needs (neon is baseline on aarch64)
VARIANT_FEATURES = {"dotprod": "asimddp", "i8mm": "i8mm"}


def greedy_tokens(bundle: Path, backend: str, prompt: str, max_tokens: int, threads: int) -> dict:
    """The prompt's ids and `max_tokens` greedy token ids (never stopping early), with timings."""
    import edgellm

    started = time.perf_counter()
    with edgellm.load(bundle, backend=backend, threads=threads) as model:
        loaded = time.perf_counter()
        prompt_ids = model.encode(prompt)
        chunks = model.stream(prompt_ids, max_tokens=max_tokens, temperature=0, stop_token_ids=())
        tokens = [chunk.token_id for chunk in chunks if chunk.token_id is not None]
        activation_bits = model.backend.describe().get("activation_bits")
    return {
        "prompt_ids": prompt_ids,
        "tokens": tokens,
        "activation_bits": activation_bits,  # the native engine's (8 on dotprod and i8mm, else 16)
        "load_seconds": round(loaded - started, 2),
        "generate_seconds": round(time.perf_counter() - loaded, 2),
    }


def cpuinfo_features(path: Path = Path("/proc/cpuinfo")) -> set[str]:
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Features":
            return set(value.split())
    return set()


def check(bundle: Path, expected: dict, want_variant: str | None, threads: int) -> dict:
    from edgellm.backends.native import ffi as native

    errors = []
    report = {
        "kernel_variant": native.kernel_variant(),
        "available_variants": native.available_variants(),
        "backends": {},
    }
    if want_variant and report["kernel_variant"] != want_variant:
        errors.append(f"the native engine chose {report['kernel_variant']}, expected {want_variant}")
    features = cpuinfo_features()
    for variant, feature in VARIANT_FEATURES.items():
        if (variant in report["available_variants"]) != (feature in features):
            errors.append(
                f"/proc/cpuinfo {'lacks' if feature not in features else 'lists'} {feature} but the "
                f"kernels {'do' if variant in report['available_variants'] else 'do not'} detect {variant} "
                "(getauxval): the cpuinfo file does not describe this CPU"
            )
    for backend in BACKENDS:
        got = greedy_tokens(bundle, backend, expected["prompt"], expected["max_tokens"], threads)
        report["backends"][backend] = got
        if got["prompt_ids"] != expected["prompt_ids"]:
            errors.append(f"{backend}: prompt encoded as {got['prompt_ids']}, the host got {expected['prompt_ids']}")
        # the native engine's 8-bit activations (dotprod, i8mm) are checked against the host's run in 8 bits
        want = expected["tokens_8bit"] if got["activation_bits"] == 8 else expected["tokens"]
        if got["tokens"] != want:
            errors.append(f"{backend}: tokens {got['tokens']}, the host got {want}")
    report["errors"] = errors
    report["ok"] = not errors
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--expected", type=Path, required=True, help="expected.json from host_reference.py")
    parser.add_argument("--variant", help="the kernel variant the native engine must choose on this CPU")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    report = check(args.bundle, json.loads(args.expected.read_text()), args.variant, args.threads)
    print(json.dumps(report), flush=True)
    for error in report["errors"]:
        print(f"error: {error}", file=sys.stderr)
    if report["ok"]:
        seconds = ", ".join(f"{name} {run['generate_seconds']} s" for name, run in report["backends"].items())
        print(
            f"ok: kernel variant {report['kernel_variant']}; {' and '.join(BACKENDS)} gave the host's "
            f"{len(report['backends']['native']['tokens'])} tokens (generating: {seconds})",
            file=sys.stderr,
        )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
