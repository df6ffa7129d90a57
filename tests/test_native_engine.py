"""The native engine (native/src/engine.c, run by edgellm.backends.native.backend) runs the bundle's
decoder like the numpy reference and ONNX Runtime do: logits within NMSE 1e-4 of both on tiny random
models (every family delta, every quant format), SmolLM2 teacher-forced against llama.cpp's fixture,
greedy tokens the same run to run and for one or two threads, weights.bin mapped rather than copied,
and a damaged manifest refused with BundleError before any C code reads through it.

Skipped when the extension was not built, unless EDGELLM_REQUIRE_NATIVE=1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import skip_without_native  # noqa: E402

import edgellm
from edgellm.backends.native import ffi as native
from edgellm.bundle.format import file_sha256
from edgellm.errors import BundleError, EdgeLLMError, InvalidSettingError
from edgellm.settings import RuntimeSettings

skip_without_native(module=True)

from bundle_reference import reference_for, reference_greedy  # noqa: E402
from conftest import FIXTURES  # noqa: E402
from parity import assert_parity  # noqa: E402
from test_golden_llamacpp import assert_agrees_with_llamacpp, teacher_forced_logits  # noqa: E402
from tiny_models import make_tiny_model, save_tiny_model  # noqa: E402

from edgellm.backends.native.backend import NativeBackend  # noqa: E402
from edgellm.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from edgellm.bundle.manifest import check_document, read_manifest  # noqa: E402
from edgellm.export.verify.numerics import first_divergence, kl_divergence, log_softmax, nmse, top1  # noqa: E402

MAX_NMSE = 1e-4
# name -> (make_tiny_model arguments, export QuantOptions arguments)
TINY = {
    "llama-tied-gqa6:2": (dict(arch="llama", tie=True, heads=6, kv_heads=2, hidden=96), {}),
    "llama-untied": (dict(arch="llama", tie=False), {}),
    "qwen2-biases": (dict(arch="qwen2", tie=False, heads=6, kv_heads=2, hidden=96), {}),
    "llama-gqa4:1": (dict(arch="llama", tie=True, heads=4, kv_heads=1), {}),
    "mistral-head_dim32": (dict(arch="mistral", tie=False, heads=4, kv_heads=2, head_dim=32, hidden=128), {}),
    "int4_sym": (dict(arch="llama", tie=True), {"symmetric": True}),
    "int8": (dict(arch="qwen2", tie=True), {"bits": 8}),
    "block64": (dict(arch="llama", tie=False, hidden=128, ffn=192), {"block": 64}),
    "int4-embeddings": (dict(arch="llama", tie=True), {"keep_8bit": ()}),
}


def settings(**fields) -> RuntimeSettings:
    return RuntimeSettings(**{"backend": "native", "threads": 2, **fields})


@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory):
    """name -> bundle folder, each exported once, on first use."""
    from edgellm.export.exporter import export_model
    from edgellm.export.options import ExportOptions, QuantOptions

    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            model_args, quant = TINY[name]
            folder = tmp_path_factory.mktemp(name.replace(":", "-"))
            args = dict(model_args)
            model = make_tiny_model(args.pop("arch"), **args)
            export_model(
                save_tiny_model(model, folder / "hf"), folder / "bundle", ExportOptions(quant=QuantOptions(**quant))
            )
            made[name] = folder / "bundle"
        return made[name]

    return get


def prompt_ids(vocab: int, n: int = 40) -> list[int]:
    return [int(t) for t in np.random.default_rng(7).integers(3, vocab, n)]


# ---- logits ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TINY))
def test_native_logits_equal_the_reference_and_onnxruntime_for_prefill_chunks_and_decode(tiny_bundles, name):
    bundle = tiny_bundles(name)
    manifest = read_manifest(bundle)
    reference = reference_for(bundle)
    ids = prompt_ids(reference.config.vocab_size)
    want = reference.forward(ids)  # [S, V], one pass
    native_backend = NativeBackend(manifest, settings(prefill_chunk=7), 64)
    ort_backend = OnnxRuntimeBackend(manifest, settings(backend="onnxruntime", prefill_chunk=7), 64)

    def traces():  # the first prefill chunk's layers, the engine's against the reference's
        reference.forward(ids[:7], trace=(expected := {}))
        return expected, native_backend.trace(ids[:7])

    try:
        got = native_backend.score(ids, decode_steps=12)
        ort = ort_backend.score(ids, decode_steps=12)
        assert_parity(got, want, MAX_NMSE, f"{name}: native vs the reference", traces)
    finally:
        native_backend.close()
        ort_backend.close()
    assert nmse(got, ort) <= MAX_NMSE, f"{name}: native vs onnxruntime {nmse(got, ort):.3g}"


@pytest.mark.parametrize("name", ["qwen2-biases", "mistral-head_dim32"])
def test_the_engine_trace_follows_the_reference_trace_layer_by_layer(tiny_bundles, name):
    manifest = read_manifest(tiny_bundles(name))
    ids = prompt_ids(manifest.config.vocab_size, 7)
    reference_for(tiny_bundles(name)).forward(ids, trace=(expected := {}))
    backend = NativeBackend(manifest, settings(prefill_chunk=8), 64)
    try:
        traced = backend.trace(ids)
    finally:
        backend.close()
    assert set(traced) == {
        f"{i}.{t}" for i in range(manifest.config.num_hidden_layers) for t in ("attn_residual", "out")
    }
    assert first_divergence(expected, traced, MAX_NMSE) is None


def test_a_chunk_gives_the_same_bits_as_its_tokens_one_by_one_and_after_a_truncate(tiny_bundles):
    bundle = tiny_bundles("qwen2-biases")
    backend = NativeBackend(read_manifest(bundle), settings(prefill_chunk=16), 160)
    try:
        ids = prompt_ids(backend.config.vocab_size, 150)  # attention over three chunks of 64 cache positions
        chunked = backend.forward(ids, all_logits=True)
        backend.reset()
        single = np.stack([backend.forward([t]) for t in ids])
        np.testing.assert_array_equal(chunked, single)
        backend.truncate(90)  # the cache keeps positions 0..89; the rest is computed again
        again = backend.forward(ids[90:], all_logits=True)
        np.testing.assert_array_equal(again, chunked[90:])
    finally:
        backend.close()


@pytest.mark.slow
def test_smollm2_native_logits_agree_with_llamacpp_teacher_forced(smollm2_bundle):
    data = np.load(FIXTURES / "llamacpp_logits.npz")
    ids, expected = data["ids"].astype(np.int64).tolist(), data["logits"].astype(np.float32)
    backend = NativeBackend(read_manifest(smollm2_bundle), settings(prefill_chunk=64), 512)
    try:
        actual = backend.score(ids, decode_steps=32)  # 256 prefilled in chunks of 64, 32 decoded
    finally:
        backend.close()
    assert actual.shape == expected.shape and np.isfinite(actual).all()
    assert_agrees_with_llamacpp(actual, expected, ids, "native")


# ---- greedy generation -----------------------------------------------------------------------------


def greedy(model, prompt, n: int) -> list[int]:
    tokens = [
        c.token_id
        for c in model.stream(prompt, max_tokens=n, temperature=0, stop_token_ids=())
        if c.token_id is not None
    ]
    assert len(tokens) == n
    return tokens


@pytest.mark.slow
def test_smollm2_greedy_tokens_are_the_same_run_to_run_and_for_one_and_two_threads(smollm2_bundle):
    prompt = "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"
    runs, logits = [], []
    for threads in (1, 2, 2):
        with edgellm.load(
            smollm2_bundle, backend="native", threads=threads, context_length=256, prefill_chunk=16
        ) as model:
            assert model.backend.describe()["threads"] == threads
            runs.append(greedy(model, prompt, 48))
            model.backend.reset()
            logits.append(model.backend.forward(model.encode(prompt), all_logits=True))
    assert runs[0] == runs[1] == runs[2]
    np.testing.assert_array_equal(logits[0], logits[1])  # every value, not just the argmax
    np.testing.assert_array_equal(logits[1], logits[2])


@pytest.mark.parametrize("name", ["llama-tied-gqa6:2", "qwen2-biases"])
def test_tiny_greedy_tokens_equal_the_reference(tiny_bundles, name):
    bundle = tiny_bundles(name)
    reference = reference_for(bundle)
    with edgellm.load(bundle, backend="native", context_length=128, prefill_chunk=5) as model:
        assert model.backend.name == "native"
        for prompt in ("The capital of France is", "東京は日本の首都です。", '{"name": "edgellm",'):
            ids = model.encode(prompt)
            assert greedy(model, ids, 40) == reference_greedy(reference, ids, 40), prompt


# ---- memory ----------------------------------------------------------------------------------------

RSS_SCRIPT = """
import json, sys
from pathlib import Path

def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out

from edgellm.backends.native.backend import NativeBackend
from edgellm.bundle.manifest import read_manifest
from edgellm.settings import RuntimeSettings

bundle = Path(sys.argv[1])
manifest = read_manifest(bundle)
before = status()
backend = NativeBackend(manifest, RuntimeSettings(backend="native", threads=2), 512)
loaded = status()
backend.forward(list(range(10, 26)))
ran = status()
print(json.dumps({"before": before, "loaded": loaded, "ran": ran}))
"""


@pytest.mark.slow
def test_loading_maps_weights_bin_and_the_resident_set_grows_by_touched_pages_not_a_copy(smollm2_bundle):
    done = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(smollm2_bundle)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    rss = json.loads(done.stdout)
    size = (smollm2_bundle / "weights.bin").stat().st_size
    grew = {when: {k: rss[when][k] - rss["before"][k] for k in rss["before"]} for when in ("loaded", "ran")}
    print(
        f"weights.bin {size / 2**20:.1f} MiB; growth in MiB: "
        + json.dumps({w: {k: round(v / 2**20, 1) for k, v in g.items()} for w, g in grew.items()})
    )
    # loading touches (almost) nothing: no copy, no pass over the weights
    assert grew["loaded"]["RssAnon"] + grew["loaded"]["RssFile"] < 0.05 * size
    # a forward reads every weight through the mapping: file-backed pages, still no anonymous copy
    assert grew["ran"]["RssFile"] > 0.8 * size
    assert grew["ran"]["RssAnon"] < 0.1 * size


# ---- damaged bundles -------------------------------------------------------------------------------


@pytest.fixture
def no_c_engine(monkeypatch):
    """Makes reaching the C engine a test failure: a damaged bundle must be refused before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the C engine was reached with a damaged manifest")

    monkeypatch.setattr(native.Engine, "__init__", refuse)


def raw_manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def refused(bundle: Path, manifest: dict) -> str:
    """The BundleError that the manifest check (every backend's) or the native backend's own raises."""
    with pytest.raises(BundleError) as failure:
        NativeBackend(check_document(bundle, manifest), settings(threads=1), 32)
    return str(failure.value)


def a_layer_tensor(manifest: dict, suffix: str) -> str:
    return next(name for name in manifest["tensors"] if name.startswith("model.layers.1.") and name.endswith(suffix))


def test_a_weights_bin_shorter_than_the_manifest_says_is_refused(tiny_bundles, tmp_path, no_c_engine):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundles("llama-untied"), bundle)
    size = (bundle / "weights.bin").stat().st_size
    with open(bundle / "weights.bin", "r+b") as handle:
        handle.truncate(size // 2)
    with pytest.raises(BundleError, match="weights.bin"):  # the file check of every load
        edgellm.load(bundle, backend="native")
    manifest = raw_manifest(bundle)  # and the tensor index check, for a manifest that agrees with the file
    manifest["files"]["weights.bin"] = {"bytes": size // 2, "sha256": file_sha256(bundle / "weights.bin")}
    message = refused(bundle, manifest)
    assert "outside weights.bin" in message


@pytest.mark.parametrize(
    "damage",
    [
        "misaligned offset",
        "offset past the end",
        "nbytes not the shape's",
        "transposed shape",
        "dtype",
        "missing tensor",
        "negative offset",
        "offset not a number",
        "shape not a list",
    ],
)
def test_a_damaged_tensor_index_is_refused_naming_the_tensor(tiny_bundles, damage, no_c_engine):
    bundle = tiny_bundles("llama-untied")
    manifest = raw_manifest(bundle)
    name = a_layer_tensor(manifest, "mlp.up_proj.weight.scales")
    entry = manifest["tensors"][name]
    size = (bundle / "weights.bin").stat().st_size
    if damage == "misaligned offset":
        entry["offset"] += 4
    elif damage == "offset past the end":
        entry["offset"] = size + 64
    elif damage == "nbytes not the shape's":
        entry["nbytes"] -= 4
    elif damage == "transposed shape":
        entry["shape"] = entry["shape"][::-1]
    elif damage == "dtype":
        entry["dtype"], entry["shape"] = "uint8", entry["shape"][:-1] + [entry["shape"][-1] * 2]  # same bytes
    elif damage == "missing tensor":
        del manifest["tensors"][name]
    elif damage == "negative offset":
        entry["offset"] = -64
    elif damage == "offset not a number":
        entry["offset"] = str(entry["offset"])
    elif damage == "shape not a list":
        entry["shape"] = None
    assert name in refused(bundle, manifest)


def test_a_matrix_the_engine_cannot_run_is_refused_with_what_to_do(tmp_path, tiny_bundles, no_c_engine):
    from edgellm.export.exporter import export_model
    from edgellm.export.options import ExportOptions, QuantOptions

    bundle = tmp_path / "block16"  # blocks of 16: a bundle ONNX Runtime runs and the native kernels do not
    export_model(
        save_tiny_model(make_tiny_model("llama", tie=True), tmp_path / "hf"),
        bundle,
        ExportOptions(quant=QuantOptions(block=16), verify=False),
    )
    with pytest.raises(BundleError) as failure:
        NativeBackend(read_manifest(bundle), settings(threads=1), 32)
    assert "blocks of 16" in str(failure.value) and "onnxruntime" in str(failure.value)
    name = "model.layers.0.self_attn.o_proj.weight"
    manifest = raw_manifest(tiny_bundles("llama-untied"))
    manifest["matrices"][name]["format"] = "int3_wat"
    assert name in refused(tiny_bundles("llama-untied"), manifest)


def test_a_bundle_without_ropes_table_is_refused_saying_to_export_it_again(tiny_bundles, no_c_engine):
    bundle = tiny_bundles("llama-untied")  # head_dim 16: a table earlier exporters kept inside model.onnx
    manifest = raw_manifest(bundle)
    del manifest["tensors"]["model.rotary_emb.inv_freq"]
    message = refused(bundle, manifest)
    assert "manifest.json" in message and "model.rotary_emb.inv_freq" in message
    assert "export the bundle again" in message


FUZZ_SCRIPT = """
import copy, json, random, sys
from pathlib import Path

from edgellm.backends.native.backend import NativeBackend
from edgellm.errors import BundleError
from edgellm.bundle.manifest import check_document
from edgellm.settings import RuntimeSettings

bundle, seed, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
manifest = json.loads((bundle / "manifest.json").read_text())
size = (bundle / "weights.bin").stat().st_size
rng = random.Random(seed)
names = sorted(manifest["tensors"])

def mutate(field, value):
    whole = lambda: rng.choice([0, 1, 63, 64, size - 64, size, size + 64, 2**31, 2**63, -64, -1])
    if field in ("offset", "nbytes") and (not isinstance(value, int) or isinstance(value, bool)):
        value = 0  # an earlier round of this loop made it something else
    if field == "shape" and not (isinstance(value, list) and all(isinstance(d, int) for d in value)):
        value = []
    if field == "offset":
        return rng.choice([value + 1, value + 64, value - 64, value * 2, whole(), None, "64", 64.0, True, [value]])
    if field == "nbytes":
        return rng.choice([value + 1, value - 1, value * 2, value // 2, 0, whole(), None, "x", 1.5])
    if field == "shape":
        if not value:
            return rng.choice([[], [1], None])
        options = [value[::-1], value[:-1], value + [1], [2 * value[0]] + value[1:], [-value[0]] + value[1:],
                   [value[0] // 2] + value[1:], [], None, "shape", [1.5] * len(value), [0] * len(value),
                   [2**40] + value[1:]]
        return rng.choice(options)
    return rng.choice(["float16", "uint8", "int8", "float32", "int64", "float64", "object", "", None, 4, "<f4"])

outcomes = {"refused": 0, "loaded": 0}
for round in range(rounds):
    damaged = copy.deepcopy(manifest)
    for _ in range(rng.randint(1, 3)):
        entry = damaged["tensors"][rng.choice(names)]
        field = rng.choice(["offset", "nbytes", "shape", "dtype"])
        entry[field] = mutate(field, entry[field])
    try:
        backend = NativeBackend(check_document(bundle, damaged),
                                RuntimeSettings(backend="native", threads=2, prefill_chunk=4), 16)
    except BundleError:
        outcomes["refused"] += 1
        continue
    backend.forward([1, 2, 3, 4, 5])  # whatever numbers the tensors now point at: a run, never a crash
    backend.forward([6])
    backend.close()
    outcomes["loaded"] += 1
print(json.dumps(outcomes))
"""


def test_fuzzed_manifest_tensor_fields_end_in_bundle_error_or_a_clean_run_never_a_crash(tiny_bundles):
    bundle = tiny_bundles("qwen2-biases")
    # in a child process: a segfault fails this test instead of killing pytest
    done = subprocess.run(
        [sys.executable, "-c", FUZZ_SCRIPT, str(bundle), "20261122", "300"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    outcomes = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcomes["refused"] + outcomes["loaded"] == 300 and outcomes["refused"] > 200, outcomes


# ---- the backend's surface -------------------------------------------------------------------------


def test_auto_resolves_to_native_and_the_backend_describes_its_kernels(tiny_bundles):
    assert RuntimeSettings(backend="auto").backend == "native"
    assert RuntimeSettings.resolve(environ={"EDGELLM_BACKEND": "auto"}).backend == "native"
    with pytest.raises(InvalidSettingError, match="native, onnxruntime, auto"):
        RuntimeSettings(backend="cuda")
    with edgellm.load(tiny_bundles("llama-untied"), backend="native", threads=2) as model:
        described = model.backend.describe()
        assert described["backend"] == "native" and described["threads"] == 2
        assert described["kernel_variant"] == native.kernel_variant()
        assert model.memory.weights == (model.bundle / "weights.bin").stat().st_size  # mapped once


def test_a_token_id_outside_the_vocabulary_is_an_error_not_a_crash(tiny_bundles):
    with edgellm.load(tiny_bundles("llama-untied"), backend="native") as model:
        with pytest.raises(EdgeLLMError, match="out of range"):
            model.backend.forward([model.config.vocab_size])
        with pytest.raises(EdgeLLMError, match="vocabulary"):
            model.backend.forward([2**40])
        assert model.backend.position == 0
        model.backend.forward([1, 2])
        assert model.backend.position == 2


# ---- 8-bit activations (what dotprod and i8mm cores run) -------------------------------------------


@pytest.mark.parametrize("name", ["llama-untied", "qwen2-biases"])
def test_8_bit_activations_stay_near_the_reference_and_keep_the_bits_of_any_chunking(tiny_bundles, name, monkeypatch):
    monkeypatch.setenv("EDGELLM_ACTIVATIONS", "8")
    manifest = read_manifest(tiny_bundles(name))
    ids = prompt_ids(manifest.config.vocab_size)
    want = reference_for(tiny_bundles(name)).forward(ids)
    runs = []
    for chunk, threads in ((7, 2), (64, 1), (16, 4)):
        backend = NativeBackend(manifest, settings(prefill_chunk=chunk, threads=threads), 64)
        try:
            assert backend.describe()["activation_bits"] == 8
            runs.append(backend.score(ids, decode_steps=12))
        finally:
            backend.close()
    np.testing.assert_array_equal(runs[0], runs[1])  # chunks of 7 on 2 threads = one chunk on 1 thread, bit for bit
    np.testing.assert_array_equal(runs[0], runs[2])  # and chunks of 16 on 4 threads
    # one int8 step per value (1/254 of its block's largest) where the 16-bit path has 1/65024: ~4e-4 on these
    # random models' logits, against the 16-bit path's MAX_NMSE
    assert MAX_NMSE < nmse(runs[0], want) <= 2e-3, f"{name}: 8-bit native vs the reference {nmse(runs[0], want):.3g}"


def test_a_bad_activation_width_is_a_clear_error(tiny_bundles, monkeypatch):
    monkeypatch.setenv("EDGELLM_ACTIVATIONS", "4")
    with pytest.raises(EdgeLLMError, match="EDGELLM_ACTIVATIONS='4': expected 8 or 16"):
        NativeBackend(read_manifest(tiny_bundles("llama-untied")), settings(), 64)


@pytest.mark.slow
def test_smollm2_8_bit_activations_against_llamacpp_and_the_float_reference(smollm2_bundle, monkeypatch):
    """Issue 20's bar for 8-bit activations on the real model (teacher-forced, 256 prefilled and 32 decoded):
    mean KL to llama.cpp <= 0.01 and perplexity within 1% of its; top-1 agreement with llama.cpp and with the
    float reference (ONNX Runtime, fp32) at least 95%. Measured: top-1 0.965 with llama.cpp (the float
    reference's own: 0.976), 0.969 with the float reference; KL 0.0035; perplexity +0.92%. On these 288
    positions one near-tie is 0.35%: native/scripts/fidelity.py measures the same on 3,072 (docs/performance.md)."""
    data = np.load(FIXTURES / "llamacpp_logits.npz")
    ids, llama = data["ids"].astype(np.int64).tolist(), data["logits"].astype(np.float32)
    monkeypatch.setenv("EDGELLM_ACTIVATIONS", "8")
    backend = NativeBackend(read_manifest(smollm2_bundle), settings(prefill_chunk=64), 512)
    try:
        eight = backend.score(ids, decode_steps=32)
    finally:
        backend.close()
    exact = teacher_forced_logits(smollm2_bundle, ids)

    def perplexity(logits: np.ndarray) -> float:
        targets = np.array(ids[1:])
        return float(np.exp(-np.mean(log_softmax(logits)[np.arange(len(targets)), targets])))

    kl = float(np.mean(kl_divergence(llama, eight)))
    print(
        f"8-bit: top1 llama.cpp {top1(eight, llama):.4f} float {top1(eight, exact):.4f} (float vs llama.cpp "
        f"{top1(exact, llama):.4f}), KL {kl:.5f}, perplexity {perplexity(eight):.3f} llama.cpp {perplexity(llama):.3f}"
    )
    assert kl <= 0.01
    assert abs(perplexity(eight) / perplexity(llama) - 1) <= 0.01
    assert top1(eight, llama) >= 0.95 and top1(eight, exact) >= 0.95
