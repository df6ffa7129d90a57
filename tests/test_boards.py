"""Board profiles and detection: recorded /proc files of real boards pick the right profile, an
unknown or contradictory board falls back to the generic one, and bad profiles or board names are
refused with errors that name the file and the field."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, skip_without_native

from edgellm.boards.detect import detect, parse_cpuinfo
from edgellm.boards.profile import (
    VARIANT_ORDER,
    all_profiles,
    capped_variant,
    load_profile,
    profile_names,
    read_profile,
)
from edgellm.errors import InvalidSettingError
from edgellm.service.unit import load_board, render_unit
from edgellm.settings import RuntimeSettings
from edgellm.units import parse_cpu_list

BOARDS = FIXTURES / "boards"
REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "fixture, arch, expected",
    [
        ("rpi5", "aarch64", "rpi5"),
        ("rpi5-container", "aarch64", "rpi5"),  # no device tree: cpuinfo's Model line names it
        ("rpi4", "aarch64", "rpi4"),
        ("rk3588", "aarch64", "rk3588"),
        ("jetson-orin", "aarch64", "jetson-orin"),
        ("qcs6490", "aarch64", "qcs6490"),
        ("unknown-aarch64", "aarch64", "generic-aarch64"),
        ("contradicting", "aarch64", "generic-aarch64"),
        ("garbage", "aarch64", "generic-aarch64"),
        ("x86-64", "x86_64", "generic-x86_64"),
    ],
)
def test_recorded_boards_pick_their_profile(fixture, arch, expected):
    found = detect(BOARDS / fixture, arch=arch)
    assert found.profile.name == expected, found.reason
    assert found.profile.arch == arch


def test_this_machine_is_the_generic_x86_64_profile():
    if os.uname().machine != "x86_64":
        pytest.skip("the project's CI and development machines are x86-64")
    found = detect()
    assert found.profile.name == "generic-x86_64"
    assert found.cpu.cores == os.cpu_count()


def test_a_device_tree_naming_a_board_whose_cores_differ_falls_back_and_says_why():
    found = detect(BOARDS / "contradicting", arch="aarch64")
    assert found.profile.name == "generic-aarch64"
    assert any("Raspberry Pi 5" in note and "Cortex-A53" in note for note in found.notes)


def test_garbage_in_the_device_tree_and_cpuinfo_is_ignored_not_matched():
    found = detect(BOARDS / "garbage", arch="aarch64")
    assert found.model == "" and found.compatible == ()  # no printable entry survives
    assert found.cpu.parts == ()
    assert found.memory_total is None


def test_profiles_of_another_architecture_never_match():
    assert detect(BOARDS / "rpi5", arch="x86_64").profile.name == "generic-x86_64"


def test_cpuinfo_is_parsed_per_core():
    cpu = parse_cpuinfo((BOARDS / "rk3588" / "proc" / "cpuinfo").read_text(), "aarch64")
    assert cpu.cores == 8
    assert cpu.parts == ("0x41:0xd05",) * 4 + ("0x41:0xd0b",) * 4
    assert "asimddp" in cpu.features and "i8mm" not in cpu.features
    assert cpu.model_name == "4x Cortex-A55 + 4x Cortex-A76"


def test_every_shipped_profile_is_valid_and_the_issue_boards_are_there():
    names = profile_names()
    for name in ("rpi5", "rpi4", "rk3588", "jetson-orin", "qcs6490", "generic-aarch64", "generic-x86_64"):
        assert name in names
    for profile in all_profiles():
        assert profile.name == Path(profile.source).stem
        if profile.kernel_ceiling:
            assert profile.kernel_ceiling in VARIANT_ORDER[profile.arch]


def test_kernel_ceilings_follow_the_cores():
    # The fixture's Features line says what the core can run; the ceiling must not exceed it.
    for board, ceiling in (("rpi4", "neon"), ("rpi5", "dotprod"), ("rk3588", "dotprod"), ("qcs6490", "dotprod")):
        features = parse_cpuinfo((BOARDS / board / "proc" / "cpuinfo").read_text(), "aarch64").features
        assert load_profile(board).kernel_ceiling == ceiling
        assert ("asimddp" in features) == (ceiling != "neon")
    arm = ["ref", "neon", "dotprod", "i8mm"]
    assert capped_variant(arm, "dotprod", "aarch64") == "dotprod"
    assert capped_variant(arm, "neon", "aarch64") == "neon"
    assert capped_variant(["ref", "neon"], "dotprod", "aarch64") == "neon"
    assert capped_variant(["ref", "avx2", "avx512vnni"], "avx2", "x86_64") == "avx2"
    assert capped_variant(arm, None, "aarch64") is None


def test_rk3588_runs_on_its_big_cores_only():
    profile = load_profile("rk3588")
    cpu = parse_cpuinfo((BOARDS / "rk3588" / "proc" / "cpuinfo").read_text(), "aarch64")
    a76 = {i for i, part in enumerate(cpu.parts) if part == "0x41:0xd0b"}
    assert parse_cpu_list(profile.big_cores) == a76 == {4, 5, 6, 7}
    settings = RuntimeSettings.resolve(environ={}, board="rk3588")
    assert parse_cpu_list(settings.cpu_affinity) == a76
    assert settings.thread_count == len(a76)
    assert settings.kernel_ceiling == "dotprod"


def test_the_rk3588_unit_pins_the_service_to_the_big_cores(tmp_path, tiny_llama_bundle):
    unit = render_unit(tiny_llama_bundle, board="rk3588")
    lines = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    assert lines["CPUAffinity"] == "4-7"
    assert "--threads 4" in lines["ExecStart"] and "--board rk3588" in lines["ExecStart"]


def test_settings_layers_flags_over_environment_over_board():
    settings = RuntimeSettings.resolve(environ={"EDGELLM_THREADS": "2"}, board="rk3588", context_length=512)
    assert settings.threads == 2 and settings.cpu_affinity == "4-7" and settings.context_length == 512
    assert RuntimeSettings.resolve(environ={"EDGELLM_BOARD": "rpi4"}).board == "rpi4"
    assert RuntimeSettings.resolve(environ={"EDGELLM_BOARD": "rpi4"}, board="none").board is None
    assert RuntimeSettings.resolve(environ={}, board="rk3588", cpu_affinity="").cpu_affinity is None
    # a board's context is a default capped by the model; an explicit one is not
    assert RuntimeSettings.resolve(environ={}, board="rpi4").context_for(8192) == 1024
    assert RuntimeSettings.resolve(environ={}, board="rpi4").context_for(512) == 512


def test_a_board_wish_list_of_providers_skips_missing_ones_but_a_user_choice_does_not():
    from edgellm.backends.onnxruntime import OnnxRuntimeBackend

    available = ["CPUExecutionProvider"]
    jetson = RuntimeSettings.resolve(environ={}, board="jetson-orin", backend="onnxruntime")
    assert jetson.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert OnnxRuntimeBackend._providers(jetson, available)[0] == ["CPUExecutionProvider"]
    chosen = RuntimeSettings(backend="onnxruntime", providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    with pytest.raises(InvalidSettingError, match="CUDAExecutionProvider"):
        OnnxRuntimeBackend._providers(chosen, available)


PIN_CHECK = """
import json, os, sys
import edgellm
model = edgellm.load(sys.argv[1], board=sys.argv[2], backend=sys.argv[3])
model.generate([1, 2, 3], max_tokens=4, temperature=0)
tasks = {int(t): sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}
from edgellm.backends.native import ffi as native
print(json.dumps({"tasks": tasks, "variant": native.kernel_variant() if native.available() else None}))
"""


@pytest.mark.parametrize("backend", ["native", "onnxruntime"])
def test_the_runtime_threads_stay_on_the_profile_cpus(tmp_path, tiny_llama_bundle, backend):
    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux and two CPUs")
    if backend == "native":
        skip_without_native()
    last = max(os.sched_getaffinity(0))
    profile = tmp_path / "pinned.toml"
    profile.write_text(
        f'name = "pinned"\ntitle = "Pinned"\n[cpu]\narch = "{os.uname().machine}"\n'
        f'[runtime]\nthreads = 2\ncpu_affinity = "{last}"\n'
    )
    result = subprocess.run(
        [sys.executable, "-c", PIN_CHECK, str(tiny_llama_bundle), str(profile), backend],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    tasks = json.loads(result.stdout)["tasks"]
    assert len(tasks) >= 2  # the pool's worker (native) or ONNX Runtime's threads exist
    assert all(cpus == [last] for cpus in tasks.values()), tasks


def test_a_kernel_ceiling_caps_the_native_variant(tmp_path, tiny_llama_bundle):

    skip_without_native("avx2")
    profile = tmp_path / "capped.toml"
    profile.write_text('name = "capped"\ntitle = "Capped"\n[cpu]\narch = "x86_64"\nkernel_ceiling = "avx2"\n')
    env = {k: v for k, v in os.environ.items() if k != "EDGELLM_KERNELS"}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            PIN_CHECK.replace("sched_getaffinity(int(t))", "sched_getaffinity(0)"),
            str(tiny_llama_bundle),
            str(profile),
            "native",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["variant"] == "avx2"


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ('name = "x"\ntitle = "X"\n[cpu\narch = "aarch64"\n', "not valid TOML"),
        ('title = "X"\n[cpu]\narch = "aarch64"\n', "name: missing"),
        ('name = "x"\ntitle = "X"\n', "cpu.arch: missing"),
        ('name = "x"\ntitle = "X"\n[cpu]\narch = "riscv64"\n', "cpu.arch: expected one of x86_64, aarch64"),
        ('name = "x"\ntitle = "X"\n[cpu]\narch = "aarch64"\nkernel_ceiling = "avx2"\n', "cpu.kernel_ceiling"),
        ('name = "x"\ntitle = "X"\n[cpu]\narch = "aarch64"\ncores = "eight"\n', "cpu.cores: expected int"),
        ('name = "x"\ntitle = "X"\n[cpu]\narch = "aarch64"\nbig_cores = "the fast ones"\n', "cpu.big_cores"),
        ('name = "x"\ntitle = "X"\n[cpu]\narch = "aarch64"\nturbo = true\n', "unknown field 'turbo'"),
        ('name = "x"\ntitle = "X"\n[cpu]\narch = "aarch64"\n[runtime]\nbackend = "gpu"\n', "runtime.backend"),
        ('name = "x"\ntitle = "X"\n[cpu]\narch = "aarch64"\n[match]\ncpu_parts = ["A76"]\n', "match.cpu_parts"),
        ('name = "x"\ntitle = "X"\n[cpu]\narch = "aarch64"\n[service]\nport = 0\n', r"\[service\]: port"),
        ('name = "x"\ntitle = "X"\n[cpu]\narch = "aarch64"\n[service]\nbig_cores = 4\n', "unknown service setting"),
        ('name = "x"\ntitle = "X"\ncpu = 4\n', r"\[cpu\]: must be a table"),
    ],
)
def test_a_malformed_profile_is_refused_naming_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "board.toml"
    path.write_text(text)
    with pytest.raises(InvalidSettingError, match=message) as error:
        read_profile(path)
    assert str(path) in str(error.value)


def test_an_unknown_board_name_lists_the_known_ones():
    with pytest.raises(InvalidSettingError, match="unknown board 'rpi9'.*rpi5"):
        load_profile("rpi9")
    with pytest.raises(InvalidSettingError, match="does not exist"):
        load_profile("/nowhere/board.toml")
    with pytest.raises(InvalidSettingError, match="unknown board"):
        RuntimeSettings.resolve(environ={"EDGELLM_BOARD": "rpi9"})
    with pytest.raises(InvalidSettingError, match="unknown board"):
        load_board("rpi9")


@pytest.mark.parametrize(
    "command",
    [
        ["run", "--board", "rpi9", "hello"],
        ["doctor", "--board", "rpi9"],
        ["service", "install", "--board", "rpi9", "--dry-run", "BUNDLE"],
    ],
)
def test_the_cli_refuses_an_unknown_board_with_one_error_line(command, tiny_llama_bundle):
    command = [str(tiny_llama_bundle) if word == "BUNDLE" else word for word in command]
    if command[0] == "run":
        command.insert(1, str(tiny_llama_bundle))
    result = subprocess.run([sys.executable, "-m", "edgellm", *command], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("error: unknown board 'rpi9'") and "Traceback" not in result.stderr


def test_pinning_to_cpus_this_machine_lacks_is_a_clear_error(tiny_llama_bundle):
    import edgellm

    with pytest.raises(InvalidSettingError, match="names CPUs this process cannot use"):
        edgellm.load(tiny_llama_bundle, board="none", cpu_affinity="4000-4001")
