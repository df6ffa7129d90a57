"""Micro-benchmark of the native matrix products, every variant this CPU runs (not a test).

    python native/scripts/bench_kernels.py [--rows 1536] [--cols 576] [--tokens 16]

Prints one JSON object per (format, variant): microseconds per matvec (1 and 2 threads) and per
matmul of `tokens` rows, the same two products (1 thread) with 8-bit activations, and the matvec's rate in
GMAC/s.
"""

import argparse
import functools
import json
import time

import numpy as np

from edgellm.backends.native import ffi as native
from edgellm.bundle.quant_formats import QUANT_FORMATS


def timed(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1536)
    parser.add_argument("--cols", type=int, default=576)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n_blocks = -(-args.cols // 32)
    x = rng.standard_normal((args.tokens, args.cols)).astype(np.float32)
    for fmt in native.FORMATS:
        per_row = n_blocks * 32 * QUANT_FORMATS[fmt].bits // 8
        qweight = rng.integers(0, 256, (args.rows, n_blocks, per_row // n_blocks), dtype=np.uint8)
        scales = rng.uniform(0.001, 0.05, (args.rows, n_blocks)).astype(np.float16)
        mins = -scales * 8 if fmt == "int4_asym" else None
        w = native.QMatrix(fmt, args.rows, args.cols, qweight, scales, mins)
        with native.ThreadPool(2) as pool:
            for variant in native.available_variants():
                with native.using_variant(variant):
                    xq = native.quantize_activations(x)
                    matvec = timed(functools.partial(native.matvec, w, xq[0]), args.repeat)
                    matvec2 = timed(functools.partial(native.matvec, w, xq[0], pool=pool), args.repeat)
                    matmul = timed(functools.partial(native.matmul, w, xq), max(1, args.repeat // args.tokens))
                    x8 = native.quantize_activations_q8a(x)
                    matvec8 = timed(functools.partial(native.matmul_q8a, w, x8[:1]), args.repeat)
                    matmul8 = timed(functools.partial(native.matmul_q8a, w, x8), max(1, args.repeat // args.tokens))
                print(
                    json.dumps(
                        {
                            "format": fmt,
                            "variant": variant,
                            "rows": args.rows,
                            "cols": args.cols,
                            "matvec_us": round(matvec * 1e6, 1),
                            "matvec_2_threads_us": round(matvec2 * 1e6, 1),
                            f"matmul_{args.tokens}_us": round(matmul * 1e6, 1),
                            "matvec_8bit_us": round(matvec8 * 1e6, 1),
                            f"matmul_{args.tokens}_8bit_us": round(matmul8 * 1e6, 1),
                            "matvec_gmac_s": round(args.rows * args.cols / matvec / 1e9, 2),
                        }
                    )
                )


if __name__ == "__main__":
    main()
