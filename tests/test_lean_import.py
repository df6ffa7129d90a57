"""The board runtime imports and runs its CLI without onnx, gguf, safetensors, torch or transformers.

Those packages are installed in the test environment, so each check runs in a fresh interpreter
whose `sys.meta_path` starts with a finder that refuses them (and every submodule), exactly as
if they were not installed. A first check proves the blocker blocks, so the others cannot pass
because nothing was blocked.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

BLOCKED = ("onnx", "gguf", "safetensors", "torch", "transformers")

RUNTIME_MODULES = (
    "edgellm",
    "edgellm.cli.app",
    "edgellm.bundle.manifest",
    "edgellm.bundle.model_config",
    "edgellm.cli.info",
    "edgellm.default_model",
    "edgellm.generate.streaming",
    "edgellm.generate.sampling",
    "edgellm.settings",
    "edgellm.bundle.weights",
    "edgellm.model",
    "edgellm.generate.generation",
    "edgellm.generate.chat",
    "edgellm.generate.chat_template",
    "edgellm.generate.tokenizer",
    "edgellm.backends.memory",
    "edgellm.cli.run",
    "edgellm.cli.bench",
    "edgellm.backends.onnxruntime",
    "edgellm.service.server",
    "edgellm.service.unit",
    "edgellm.bundle.quant_formats",
    "edgellm.generate.template_sandbox",
    "edgellm.service.server.connections",
)

# Installed first thing in the child interpreter, before anything from edgellm is imported.
BLOCKER = textwrap.dedent(f"""
    import importlib.abc
    import sys

    BLOCKED = {BLOCKED!r}

    class RefuseHeavyPackages(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:  # "onnx" and "onnx.helper", not "onnxruntime"
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by test_lean_import)", name=name)
            return None

    sys.meta_path.insert(0, RefuseHeavyPackages())
    assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED], "imported before the blocker"

    def heavy_modules_loaded():
        return sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
""")


def run_blocked(body: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `body` in a fresh interpreter with the heavy packages blocked; argv[1:] is `args`."""
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(body), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_blocker_really_refuses_each_heavy_package_and_its_submodules(tmp_path):
    body = """
        import importlib
        import json

        refused = []
        for name in BLOCKED + ("onnx.helper", "safetensors.numpy", "torch.nn", "transformers.models"):
            try:
                importlib.import_module(name)
            except ImportError:
                refused.append(name)
        import onnxruntime  # the runtime's own engine must still import
        print(json.dumps({"refused": refused, "loaded": heavy_modules_loaded()}))
    """
    result = run_blocked(body, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["refused"] == list(BLOCKED) + ["onnx.helper", "safetensors.numpy", "torch.nn", "transformers.models"]
    assert report["loaded"] == []


def test_the_runtime_modules_and_edgellm_help_need_none_of_the_export_packages(tmp_path):
    body = f"""
        import importlib
        import json

        for name in {RUNTIME_MODULES!r}:
            importlib.import_module(name)

        from typer.testing import CliRunner
        from edgellm.cli.app import app

        runner = CliRunner()
        helps = [runner.invoke(app, args, prog_name="edgellm") for args in (["--help"], ["export", "--help"],
                                                                            ["info", "--help"])]
        print(json.dumps({{"exit_codes": [h.exit_code for h in helps], "outputs": [h.output for h in helps],
                          "loaded": heavy_modules_loaded()}}))
    """
    result = run_blocked(body, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["exit_codes"] == [0, 0, 0], report["outputs"]
    main_help, export_help, info_help = report["outputs"]
    assert "export" in main_help and "info" in main_help
    assert "--output" in export_help and "--force" in export_help
    assert "--json" in info_help
    assert report["loaded"] == [], f"the runtime pulled in {report['loaded']}"


def test_export_without_the_export_extra_fails_with_one_line_saying_what_to_install(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    body = """
        import atexit

        from edgellm.cli.app import main

        # Printed to stdout at exit, so the error line on stderr stays alone.
        atexit.register(lambda: print("loaded:", ",".join(heavy_modules_loaded())))
        main()
    """
    result = run_blocked(body, "export", "model.gguf", "-o", "bundle", cwd=tmp_path)
    shown = f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode != 0, shown
    assert "Traceback" not in result.stdout + result.stderr, shown
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), shown
    for package in ("onnx", "gguf", "safetensors"):
        assert package in lines[0], shown
    assert "pip install 'edgellm[export]'" in lines[0], shown
    assert result.stdout.strip().splitlines()[-1] == "loaded:", shown
    assert not (tmp_path / "bundle").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_a_bundle_loads_and_streams_with_the_export_packages_blocked(tmp_path, tiny_llama_bundle):
    bundle = tiny_llama_bundle
    body = """
        import json, sys
        import edgellm

        with edgellm.load(sys.argv[1]) as model:
            chunks = list(model.chat([{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0,
                                     stop_token_ids=()))
        print(json.dumps({"generated": chunks[-1].stats.generated_tokens, "loaded": heavy_modules_loaded()}))
    """
    result = run_blocked(body, str(bundle), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"generated": 6, "loaded": []}
