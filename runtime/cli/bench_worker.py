"""One engine, one process: the measuring side of `edgellm bench` (edgellm.cli.bench drives it).

    python -m edgellm.cli.bench_worker < job.json

The job names an engine, its model, the thread count, the context and the prompts (token ids, the
same for every engine). The worker imports the engine, loads the model, produces one token for the
short prompt and says so at once on its protocol stream (the parent timestamps that line: spawn to
first token, cold), warms up, then measures prefill at each prompt length on a fresh KV cache and
greedy decode, and ends with one JSON result line that carries its own peak RSS. Running each
engine in its own process keeps imports, threads and resident memory of one engine out of the
numbers of another.

Protocol: JSON lines on the stream the worker got as stdout; anything a library prints goes to
stderr instead (fd 1 is pointed at fd 2 before any engine is imported).

    python -m edgellm.cli.bench_worker build-genai SOURCE OUTPUT

writes an onnxruntime-genai model folder for a GGUF file or a Hugging Face folder (the builder
takes float GGUFs only, so a quantized GGUF is first written out as a float Hugging Face folder).
It needs the export extras, torch, transformers and onnx-ir; the runtime never imports it.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

MIB = 2**20


# -- the engines: load, reset (untimed), prefill -> first token, step -> next token -------------------
class EdgeLLMEngine:
    """edgellm's own decode loop: Generator.generate_step with greedy sampling, EOS not special. The
    backend is the job's ("auto" unless it names one: the native engine when it is built)."""

    name = "edgellm"

    def __init__(self, model: str, threads: int, context: int, backend: str = "auto"):
        import edgellm.model  # lazy: timed (the worker measures each engine's imports apart from its load)
        from edgellm.generate.sampling import Sampler, SamplingParams  # lazy: timed, as above

        self.model = edgellm.model.load(model, threads=threads, context_length=context, backend=backend)
        self.sampler = Sampler(SamplingParams(temperature=0.0), self.model.config.vocab_size)
        self.steps = None

    @staticmethod
    def import_modules(job: dict) -> None:
        """What edgellm.load imports on first use, so that load_s is the load alone, as for the peers
        (import llama_cpp and import onnxruntime_genai load their libraries before their load is timed)."""
        import tokenizers  # noqa: F401  (the tokenizer library)

        from edgellm.settings import RuntimeSettings  # lazy: timed, as above

        backend = RuntimeSettings(backend=job.get("backend", "auto")).backend  # "auto" loads the C extension
        if backend in ("onnxruntime", "npu"):
            import onnxruntime  # noqa: F401

    def describe(self) -> dict:
        from edgellm import __version__  # lazy: timed, as above

        backend = self.model.backend
        described = backend.describe()
        if backend.name == "native":
            return {
                "version": __version__,
                "backend": f"native C engine ({described['kernel_variant']} kernels)",
                "kernel_variant": described["kernel_variant"],
                "activation_bits": described["activation_bits"],
                "config": {
                    "prefill_chunk": backend.prefill_chunk,
                    "context": backend.context_length,
                    "weights": "bundle weights.bin mapped in place (GGUF blocks carried over; "
                    + (
                        "8-bit activations, the head's 16-bit)"
                        if described["activation_bits"] == 8
                        else "16-bit activations as two int8 planes)"
                    ),
                },
            }
        import onnxruntime

        if backend.name == "npu":
            quant = self.model.manifest.npu.scheme
            return {
                "version": __version__,
                "backend": f"npu {onnxruntime.__version__} QNN HTP (SoC model {described['soc_model']})",
                "kernel_variant": "qnn-htp",  # bench's machine.kernel_variant (else it says onnxruntime-mlas)
                "config": {
                    "prefill_chunk": backend.prefill_chunk,
                    "context": backend.context_length,
                    "execution_provider": described["execution_provider"],
                    "soc_model": described["soc_model"],
                    "weights": f"npu_weights.bin: static-shape {quant} QDQ graphs, embedding on the host",
                },
            }
        return {
            "version": __version__,
            "backend": f"{backend.name} {onnxruntime.__version__} CPU",
            "kernel_variant": "onnxruntime-mlas",
            "config": {
                "prefill_chunk": backend.prefill_chunk,
                "context": backend.context_length,
                "weights": "bundle weights.bin (GGUF blocks carried over; MatMulNBits fp32 kernel)",
            },
        }

    def reset(self) -> None:
        if self.steps is not None:
            self.steps.close()
            self.steps = None
        self.model.generator.cached_ids.clear()
        self.model.backend.reset()

    def prefill(self, ids: Sequence[int]) -> int:
        room = self.model.backend.context_length - len(ids)
        self.steps = self.model.generator.generate_step(ids, self.sampler, room)
        return next(self.steps)

    def step(self) -> int:
        return next(self.steps)


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python's low-level eval; greedy is the argmax of the last logits."""

    name = "llama.cpp"

    def __init__(self, model: str, threads: int, context: int):
        import llama_cpp
        import numpy as np

        self.np, self.llama_cpp = np, llama_cpp
        batch = max(512, context)  # the longest prompt goes through in one batch (llama.cpp caps it at n_ctx)
        self.llm = llama_cpp.Llama(
            model_path=model,
            n_ctx=context,
            n_batch=batch,
            n_ubatch=batch,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()
        self.token = -1

    @staticmethod
    def import_modules(job: dict) -> None:
        import llama_cpp  # noqa: F401

    def describe(self) -> dict:
        info = self.llama_cpp.llama_print_system_info().decode(errors="replace")
        # "CPU : SSE3 = 1 | AVX2 = 1 | ... | OPENMP = 1 | REPACK = 1 |"
        features = [
            part.split("=")[0].split(":")[-1].strip() for part in info.split("|") if part.strip().endswith("= 1")
        ]
        return {
            "version": self.llama_cpp.__version__,
            "backend": "ggml CPU (" + " ".join(features) + ")",
            "config": {"n_ctx": self.llm.n_ctx(), "n_batch": self.llm.n_batch, "weights": "the GGUF as it is"},
        }

    def _argmax(self) -> int:
        logits = self.np.ctypeslib.as_array(
            self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,)
        )
        return int(self.np.argmax(logits))

    def reset(self) -> None:
        self.llm.reset()  # the next eval removes every cached position from n_tokens = 0 on

    def prefill(self, ids: Sequence[int]) -> int:
        self.llm.eval(list(ids))
        self.token = self._argmax()
        return self.token

    def step(self) -> int:
        self.llm.eval([self.token])
        self.token = self._argmax()
        return self.token


class OnnxRuntimeGenAIEngine:
    """onnxruntime-genai's Generator; min_length = max_length keeps EOS from ending the run."""

    name = "onnxruntime-genai"

    def __init__(self, model: str, threads: int, context: int):
        import numpy as np
        import onnxruntime_genai as og

        self.np, self.og, self.context = np, og, context
        config = og.Config(model)
        config.clear_providers()  # CPU
        config.overlay(
            json.dumps(
                {
                    "model": {
                        "decoder": {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}
                    }
                }
            )
        )
        self.model = og.Model(config)
        self.generator = None

    @staticmethod
    def import_modules(job: dict) -> None:
        import onnxruntime_genai  # noqa: F401

    def describe(self) -> dict:
        import onnxruntime

        return {
            "version": self.og.__version__,
            "backend": f"onnxruntime {onnxruntime.__version__} CPU via genai",
            "config": {
                "max_length": self.context,
                "weights": "int4 RTN from the float weights by the genai model builder (defaults)",
            },
        }

    def reset(self) -> None:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.context, min_length=self.context, do_sample=False)
        self.generator = self.og.Generator(self.model, params)

    def _next(self) -> int:
        self.generator.generate_next_token()
        return int(self.generator.get_next_tokens()[0])

    def prefill(self, ids: Sequence[int]) -> int:
        self.generator.append_tokens(self.np.asarray(ids, dtype=self.np.int32))
        return self._next()  # samples from the prompt's logits; no forward

    def step(self) -> int:
        return self._next()  # runs the last token, then samples


ENGINES = {engine.name: engine for engine in (EdgeLLMEngine, LlamaCppEngine, OnnxRuntimeGenAIEngine)}


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, including steal; CPU seconds of this process)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    try:
        with open("/proc/stat") as stat:
            ticks = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, own.ru_utime + own.ru_stime
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is inside user)
    return busy / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime


# -- one measurement -----------------------------------------------------------------------------------
def measure(job: dict[str, Any], say: Callable[[dict], None]) -> dict[str, Any]:
    """Load, first token (announced through `say`), warm-up, then the timed work of one run."""
    engine_class = ENGINES[job["engine"]]
    clock = time.perf_counter
    started = clock()
    engine_class.import_modules(job)
    imported = clock()
    options = {"backend": job["backend"]} if job.get("backend") and engine_class is EdgeLLMEngine else {}
    engine = engine_class(job["model"], int(job["threads"]), int(job["context"]), **options)
    loaded = clock()
    engine.reset()
    engine.prefill(job["first_token_prompt"])
    say({"event": "first_token"})
    in_process_ttft = clock() - loaded

    prompts = {int(length): ids for length, ids in job["prompts"].items()}
    longest = prompts[max(prompts)]
    engine.reset()  # warm-up: ONNX Runtime grows its arenas and llama.cpp its graph on the first big batch
    engine.prefill(longest)
    for _ in range(2):
        engine.step()

    prefill_seconds, decode_seconds, greedy = {}, 0.0, []
    busy_before, own_before, timed_from = *cpu_seconds(), clock()
    for length in sorted(prompts):
        engine.reset()
        start = clock()
        decoded = [engine.prefill(prompts[length])]
        prefill_seconds[str(length)] = clock() - start
        if length == int(job["decode_after"]):
            start = clock()
            for _ in range(int(job["decode_tokens"])):
                decoded.append(engine.step())
            decode_seconds = clock() - start
            greedy = decoded
    busy_after, own_after = cpu_seconds()
    # What other processes (and the hypervisor's steal) took while we measured, in cores: on a shared
    # machine this says which runs were disturbed.
    background = max(0.0, (busy_after - busy_before) - (own_after - own_before)) / (clock() - timed_from)
    return {
        "event": "result",
        **engine.describe(),
        "import_s": imported - started,
        "load_s": loaded - imported,
        "ttft_in_process_s": in_process_ttft,
        "prefill_s": prefill_seconds,
        "decode_s": decode_seconds,
        "greedy_tokens": greedy,
        "background_cpu_cores": background,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB,
    }


# -- building the onnxruntime-genai peer model -----------------------------------------------------
def build_genai(source: Path, output: Path) -> None:
    """Run the genai model builder (int4, CPU) on `source` into `output`; the caller renames it into place."""
    import shutil
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="genai-build-", dir=output.parent) as scratch:
        hf = Path(source)
        if hf.is_file():
            from edgellm.export.sources.float_hf import write_float_hf_folder  # lazy: optional (the export extra)

            hf = write_float_hf_folder(hf, Path(scratch) / "hf")
        command = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(hf),
            "-o",
            str(output),
            "-p",
            "int4",
            "-e",
            "cpu",
            "-c",
            str(Path(scratch) / "cache"),
        ]
        done = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.STDOUT)
        if done.returncode != 0 or not (output / "genai_config.json").is_file():
            shutil.rmtree(output, ignore_errors=True)
            raise SystemExit(f"the onnxruntime-genai model builder failed (exit {done.returncode})")


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["build-genai"]:
        build_genai(Path(argv[1]), Path(argv[2]))
        return 0
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever an engine prints lands on stderr, not in the protocol
    sys.stdout = sys.stderr

    def say(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    try:
        job = json.loads(sys.stdin.read())
        say(measure(job, say))
        return 0
    except Exception as error:  # reported to the parent, which raises an EdgeLLMError with it
        import traceback

        traceback.print_exc()
        say({"event": "error", "message": f"{type(error).__name__}: {error}", "hint": getattr(error, "hint", None)})
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
