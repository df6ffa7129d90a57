#!/usr/bin/env python3
"""Emulated Arm cost of edgellm's matrix products, per 32-weight block per token, and a guard against regressions.

    python3 native/scripts/armcost.py [--json]                                     # a table (or JSON)
    python3 native/scripts/armcost.py --baseline native/scripts/armcost_baseline.json           # exit 1 if regressed
    python3 native/scripts/armcost.py --baseline native/scripts/armcost_baseline.json --update  # rewrite it

Cross-compiles armcost_bench.c with native/src for aarch64 (the sources and flags `make -C native` uses, linked
statically as the shared tool needs) and runs it under qemu through the shared armcost tool
(../shared/tools/armcost from the repository root, or $ARMCOST_DIR): count.sh counts the guest instructions between
the bench's mark_begin and mark_end, so the data set-up and the warm-up product are not counted, and gives a
Cortex-A76 port-pressure cycle bound. Cases: SmolLM2-135M's two matrix shapes as decode (1 token) and a 64-token
prefill chunk, int4_asym, on cortex-a76 (dotprod) and max (i8mm), plus the int8_sym head's shape; each with 16-bit
activations and 8-bit ones. A case fails when its A76 cycle bound exceeds the baseline's
by more than 10%; instruction counts are reported, not checked. Needs gcc-aarch64-linux-gnu and qemu-user-static.
"""

import argparse
import concurrent.futures
import contextlib
import datetime
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NATIVE = os.path.join(ROOT, "native")
ARMCOST_DIR = os.environ.get("ARMCOST_DIR", os.path.join(ROOT, "..", "shared", "tools", "armcost"))
CC = "aarch64-linux-gnu-gcc"
TOLERANCE = 0.10
CPUS = (("cortex-a76", "dotprod"), ("max", "i8mm"))  # qemu CPU model, the variant forced on it
# (format, rows, cols, tokens): SmolLM2-135M's 576-column rows (q/k/v/o/gate/up) and 1536-column ones (down),
# decode and a prefill chunk, and the tied int8 head's shape (4096 rows of a 49152-row head).
SHAPES = (
    ("int4_asym", 1536, 576, 1),
    ("int4_asym", 576, 1536, 1),
    ("int4_asym", 1536, 576, 64),
    ("int4_asym", 576, 1536, 64),
    ("int8_sym", 4096, 576, 1),
)
# Counts are deterministic, so repetitions only average the per-call work (argument checks, mallocs) the same
# way for every shape; counting costs ~0.7 us per guest instruction, so ~250k block-tokens (~10 M instructions)
# per case. A prefill chunk is already 1.8 M block-tokens: one repetition.
BLOCK_TOKENS_PER_CASE = 250_000


def die(message):
    """Exit 2: the harness could not measure (exit 1 is kept for a regression)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load_armcost():
    """The shared tool's armcost.py, for count() and per_block(): the same counting and formula as its own figures."""
    path = os.path.join(ARMCOST_DIR, "armcost.py")
    if not os.path.exists(path):
        die(f"no {path}; set ARMCOST_DIR to the shared armcost tool")
    spec = importlib.util.spec_from_file_location("armcost_shared", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


KINDS = ("q16a", "q8a")  # the activations: 16-bit (two int8 planes) and 8-bit


def build(out_dir):
    """The bench, statically linked with the sources `make -C native` builds, with the flags CI gives it."""
    make = ["make", "-s", "--no-print-directory", "-C", NATIVE, f"CC={CC}", "CFLAGS=-O2 -Werror"]
    make += ["--eval", "print-%: ; @echo $($*)", "print-SRC", "print-CFLAGS", "print-LDLIBS"]
    # a clean environment: under `make test`, the parent's MAKEFLAGS would add "Entering directory" lines
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    srcs, cflags, ldlibs = (v.split() for v in run(make, env=env).splitlines())
    bench = os.path.join(out_dir, "armcost_bench")
    flags = [*cflags, "-static", f"-I{NATIVE}"]
    run(
        [CC, *flags, "-o", bench, os.path.join(NATIVE, "scripts", "armcost_bench.c")]
        + [f"{NATIVE}/{s}" for s in srcs]
        + ldlibs
    )
    return bench


class Case(NamedTuple):
    kind: str  # activations: q16a or q8a
    fmt: str
    cpu: str
    variant: str
    rows: int
    cols: int
    tokens: int
    reps: int


def cases():
    """{name: Case}; the name is the baseline's key."""
    out = {}
    for kind in KINDS:
        for fmt, rows, cols, tokens in SHAPES:
            for cpu, variant in CPUS:
                reps = max(1, round(BLOCK_TOKENS_PER_CASE / (rows * -(-cols // 32) * tokens)))
                name = f"{kind} {fmt} {variant} {rows}x{cols} t{tokens}"
                out[name] = Case(kind, fmt, cpu, variant, rows, cols, tokens, reps)
    return out


def measure(armcost, bench, case):
    argv = [bench, case.kind, case.fmt, str(case.rows), str(case.cols), str(case.tokens), str(case.reps)]
    try:
        c = armcost.count(case.cpu, argv, env={"EDGELLM_KERNELS": case.variant})
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{' '.join(argv[1:])} on {case.cpu} ({case.variant}) failed:\n{e.stderr}") from e
    # Every repetition is `tokens` more products of the same rows.
    return {**armcost.per_block(c, case.rows, case.cols, case.tokens * case.reps), "reps": case.reps}


def measure_all(armcost):
    """{case name: per block-token figures}, in the order of cases()."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            bench = build(tmp)
        except subprocess.CalledProcessError as e:
            die(f"building the bench failed:\n{e.stderr}")
        todo = cases()
        print(
            f"measuring {len(todo)} cases ({' and '.join(KINDS)} activations) on {os.cpu_count()} cores",
            file=sys.stderr,
        )
        # One case per core (a qemu process feeding a Python counter), the prefill chunks, the long ones, first.
        order = sorted(todo, key=lambda k: -todo[k].tokens)
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
            futures = {key: pool.submit(measure, armcost, bench, todo[key]) for key in order}
            try:
                return {key: futures[key].result() for key in todo}
            except RuntimeError as e:
                pool.shutdown(cancel_futures=True)
                die(e)


def toolchain():
    with open(os.path.join(ARMCOST_DIR, "qcount.py"), "rb") as f:
        model = hashlib.sha256(f.read()).hexdigest()[:16]
    return {
        "gcc": run([CC, "-dumpfullversion"]).strip(),
        "qemu": run(["qemu-aarch64-static", "--version"]).splitlines()[0],
        "armcost_qcount_sha256": model,
    }


def git(*args):
    return run(["git", "-C", ROOT, *args]).splitlines()


def compare(results, doc, baseline):
    """Prints the changes against the baseline; returns the cases whose cycle bound regressed."""
    for tool, version in doc["toolchain"].items():
        if baseline["toolchain"].get(tool) != version:
            print(f"note: {tool} was {baseline['toolchain'].get(tool)} for the baseline, is {version}: counts may move")
    regressed = []
    for key, r in results.items():
        base = baseline["cases"].get(key)
        if base is None:
            print(f"new (not in the baseline): {key}")
        elif r["cycles"] > base["cycles"] * (1 + TOLERANCE):
            regressed.append(key)
            print(
                f"REGRESSION {key}: A76 cycles per block-token {r['cycles']:.2f} > {base['cycles']:.2f} "
                f"(baseline {baseline['commit'][:10]}) + {TOLERANCE:.0%}"
            )
    for key in baseline["cases"].keys() - results.keys():
        print(f"in the baseline, not measured: {key}")
    return regressed


def print_table(results, baseline):
    cases = baseline["cases"] if baseline else {}
    print(
        f"{'case (per 32-weight block per token)':40s} {'reps':>4s} {'instr':>7s} {'A76 cyc':>7s} {'dot':>5s}"
        + ("  baseline  change" if baseline else "")
    )
    for key, r in results.items():
        line = f"{key:40s} {r['reps']:4d} {r['instructions']:7.2f} {r['cycles']:7.2f} {r['dot']:5.2f}"
        if key in cases:
            base = cases[key]["cycles"]
            line += f"  {base:8.2f}  {(r['cycles'] / base - 1):+6.1%}"
        print(line)


def print_llama_reference(armcost):
    """llama.cpp's figures, if the shared tool has measured them here (`armcost.py llama` or `compare`)."""
    ref = {}
    for name in ("armcost-compare.json", "armcost-llama.json"):
        path = os.path.join(armcost.CACHE, name)
        if os.path.exists(path):
            with open(path) as f:
                ref.update((k, v) for k, v in json.load(f).items() if k.startswith("llama.cpp"))
    if ref:
        print(f"llama.cpp, cached by the shared armcost tool in {armcost.CACHE} (not measured by this run):")
        for key, v in ref.items():
            print(f"{key:40s}      {v['instructions']:7.2f} {v['cycles']:7.2f} {v['dot']:5.2f}")
    return ref


# (label, side, decode kernel, prefill kernel, head case, MB read per token): the shared tool's predict() keys
# are f"{side} {kernel} {shape} t{tokens}". edgellm's default on these cores: 8-bit layers, 16-bit head.
PREDICTIONS = (
    ("edgellm dotprod", "q8a", "int4_asym dotprod", "int4_asym dotprod", "q16a int8_sym dotprod 4096x576 t1", 96.6),
    ("edgellm i8mm", "q8a", "int4_asym i8mm", "int4_asym i8mm", "q16a int8_sym i8mm 4096x576 t1", 96.6),
    ("llama.cpp Q4_1", "llama.cpp", "q4_1", "q4_1", "llama.cpp q8_0 4096x576 t1", 96.6),
    ("llama.cpp Q4_0 repacked", "llama.cpp", "r4_0", "r4_0", "llama.cpp q8_0 4096x576 t1", 89.8),
    ("llama.cpp Q4_0 4x8 i8mm", "llama.cpp", "r4_0", "r4_0x8", "llama.cpp q8_0 4096x576 t1", 89.8),
)


def print_prediction(armcost, results, ref):
    """The shared tool's SmolLM2-135M prediction from these counts (matmuls only, a 2.4 GHz A76, 10 GB/s)."""
    res = {**results, **ref}
    print("SmolLM2-135M on a 2.4 GHz Cortex-A76, 10 GB/s (matmuls only; decode: the longer of compute and DRAM time):")
    for label, side, decode, prefill, head, mbytes in PREDICTIONS:
        try:
            rows = armcost.predict(res, side, decode, prefill, head, mbytes)
        except KeyError:
            continue  # llama.cpp not measured here
        for r in rows:
            print(
                f"  {label:24s} {r['threads']} threads: decode {r['decode_tok_s']:4d} tok/s"
                f"  prefill {r['prefill_tok_s_matmuls']:5d} tok/s"
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON (the baseline's format)")
    parser.add_argument("--baseline", help="compare with this file: exit 1 if a cycle bound exceeds it by >10%%")
    parser.add_argument("--update", action="store_true", help="rewrite the --baseline file with this run")
    args = parser.parse_args()
    if args.update and not args.baseline:
        parser.error("--update needs --baseline FILE")
    missing = [
        p
        for p, tool in (("gcc-aarch64-linux-gnu", CC), ("qemu-user-static", "qemu-aarch64-static"))
        if not shutil.which(tool)
    ]
    if missing:
        die(f"missing {' '.join(missing)}; install with: apt-get install -y {' '.join(missing)}")
    baseline = None
    if args.baseline and os.path.exists(args.baseline):
        with open(args.baseline) as f:
            baseline = json.load(f)
    elif args.baseline and not args.update:
        die(f"no baseline {args.baseline} (write one with --update)")
    armcost = load_armcost()
    start = time.monotonic()
    results = measure_all(armcost)
    doc = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "HEAD")[0],
        # The native sources measured differ from the commit's in these files (empty: they are the commit's).
        "uncommitted": git("status", "--porcelain", "--", "native/src", "native/edgellm.h", "native/Makefile"),
        "toolchain": toolchain(),
        "cases": results,
    }
    # With --json, stdout is the document alone; the table and the verdict go to stderr.
    out = sys.stderr if args.json else sys.stdout
    with contextlib.redirect_stdout(out):
        print_table(results, baseline)
        if not args.json:
            print_prediction(armcost, results, print_llama_reference(armcost))
        regressed = compare(results, doc, baseline) if baseline else []
        print(f"{len(results)} cases in {time.monotonic() - start:.0f} s")
    if args.json:
        print(json.dumps(doc, indent=1))
    if args.update:
        with open(args.baseline, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        print(f"wrote {args.baseline}", file=out)
    elif regressed:
        print(f"FAIL: {len(regressed)} case(s) over the baseline by more than {TOLERANCE:.0%}", file=out)
        sys.exit(1)


if __name__ == "__main__":
    main()
