"""Tiny models and bundles for the NPU tests (helpers, not a test module).

The NPU tests compare greedy tokens of the NPU backend with the CPU backend's. A tiny *random*
model is a poor subject for that: its logits are nearly flat (top-2 gaps of 1e-3 against a logit
spread of ~1), so any two quantizations of it (the CPU bundle's int4 blocks, the NPU's int8 channels)
pick different greedy paths after a few tokens, whatever the code does. `trained_tiny_llama` is
the tiny random llama of tiny_models.py after 100 Adam steps on the tokenizer's own training text:
its predictions are peaked like a real model's, so greedy agreement measures the NPU path. The
random model is still used where logits are compared directly (KL, top-1 teacher-forced).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

NPU_CHUNK, NPU_CONTEXT = 16, 128  # small graphs: the simulator's time grows with both
TRAIN_STEPS = 100

_cache_root = Path(tempfile.mkdtemp(prefix="edgellm-npu-tests-"))
atexit.register(shutil.rmtree, _cache_root, True)


def trained_tiny_llama(steps: int = TRAIN_STEPS):
    """make_tiny_model("llama", tie=True) trained for `steps` on TRAINING_TEXT (seeded, ~3 s)."""
    import torch
    from tiny_models import TRAINING_TEXT, make_tiny_model, tiny_tokenizer_json
    from tokenizers import Tokenizer

    model = make_tiny_model("llama", tie=True)
    tokenizer = Tokenizer.from_str(tiny_tokenizer_json())
    stream = [t for text in TRAINING_TEXT for t in tokenizer.encode(text).ids + [2]]  # 2 = <|im_end|>
    window = 64
    batch = torch.tensor([stream[i : i + window] for i in range(0, len(stream) - window, 16)])
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def npu_bundle(kind: str = "trained", quant: str = "a16w8") -> Path:
    """A tiny llama exported with --profile npu (once per test session; copy it to change it).
    kind: "trained" (see the module docstring) or "random"."""
    return _npu_bundle(kind, quant)


@functools.cache
def _npu_bundle(kind: str, quant: str) -> Path:
    from tiny_models import make_tiny_model, save_tiny_model

    from edgellm.export.exporter import export_model
    from edgellm.export.options import ExportOptions, NpuOptions

    folder = _cache_root / f"{kind}-{quant}"
    model = trained_tiny_llama() if kind == "trained" else make_tiny_model("llama", tie=True)
    hf = save_tiny_model(model, folder / "hf")
    export_model(hf, folder / "bundle", ExportOptions(profile="npu", npu=NpuOptions(NPU_CHUNK, NPU_CONTEXT, quant)))
    return folder / "bundle"


def cpu_provider_decoder(manifest):
    """The bundle's NPU graphs on ONNX Runtime's CPU provider behind the runtime's host loop (NpuDecoder,
    the bundle's host embedding): what the exporter verified, to hold the HTP or the reference against."""
    from edgellm.backends.npu.host import HostEmbedding, NpuDecoder
    from edgellm.bundle.weights import BundleWeights
    from edgellm.export.verify.npu import cpu_sessions

    npu = manifest.npu
    sessions = cpu_sessions({npu.chunk: manifest.path(npu.prefill_file), 1: manifest.path(npu.decode_file)})
    embed = HostEmbedding(BundleWeights.of(manifest), manifest.matrices["model.embed_tokens.weight"])
    return NpuDecoder(manifest.config, npu.context, sessions, embed)


def copy_bundle(bundle: Path, destination: Path) -> Path:
    """A copy without the compiled-context cache (so the copy compiles afresh)."""
    shutil.copytree(bundle, destination, ignore=shutil.ignore_patterns("npu_cache"))
    return destination
