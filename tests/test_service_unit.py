"""The systemd unit: rendered for a bundle and a board, it passes `systemd-analyze verify`, rates
"OK" or better in `systemd-analyze security` (exposure <= 4.9), installs and uninstalls, and the
real server runs inside its syscall sandbox (MemoryDenyWriteExecute included) on every backend."""

from __future__ import annotations

import math
import platform
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from server_harness import MODEL_NAME, start_server, tiny_bundle, unit_syscall_policy

from edgellm.backends.memory import MIB, estimate
from edgellm.bundle.manifest import read_manifest
from edgellm.errors import EdgeLLMError, InvalidSettingError
from edgellm.service.options import ServiceOptions
from edgellm.service.unit import (
    MEMORY_HEADROOM,
    SERVER_OVERHEAD,
    fill_template,
    install,
    load_board,
    render_unit,
    uninstall,
    unreadable_by_service,
)
from edgellm.settings import CPU_BACKENDS

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is missing (apt-get install systemd)"
)
EXPOSURE_LIMIT = 4.9  # "OK" or better


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory)


def directives(unit_text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit_text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def write_unit(text: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "edgellm.service"
    path.write_text(text)
    return path


def verify(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)


def exposure(path: Path) -> float:
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for edgellm\.service: ([0-9.]+)", done.stdout)
    assert match, done.stdout[-2000:] + done.stderr
    return float(match.group(1))


VARIANTS = {
    "loopback": {},
    "a board with big cores, an NPU device and its own memory figure": {
        "board": {
            "service": {
                "cpu_affinity": "4-7",
                "memory_max": "1536M",
                "threads": 4,
                "nice": -5,
                "device_allow": ["/dev/fastrpc-cdsp rw"],
                "supplementary_groups": ["render"],
                "environment": {"EDGELLM_KERNELS": "ref"},
            }
        }
    },
    "listening on the LAN with an allow list and an API key": {
        "host": "0.0.0.0",
        "ip_address_allow": ["192.168.1.0/24"],
        "api_key_file": "/etc/edgellm/api-key",
    },
    "listening on every address": {"host": "0.0.0.0", "port": 9000},
}


@pytest.mark.system
@needs_systemd_analyze
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_rendered_unit_verifies_and_rates_ok_or_better(bundle, tmp_path, variant):
    text = render_unit(bundle, context=512, **VARIANTS[variant])
    path = write_unit(text, tmp_path / "unit")
    done = verify(path)
    assert done.returncode == 0 and "edgellm.service" not in done.stderr, done.stderr
    score = exposure(path)
    print(f"\nsystemd-analyze security, {variant}: exposure {score}")
    assert score <= EXPOSURE_LIMIT


def test_the_unit_has_the_hardening_and_life_cycle_the_service_needs(bundle):
    found = directives(render_unit(bundle, context=512))
    expected = {
        "Type": "notify",
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "Restart": "on-failure",
        "WatchdogSec": "60",
        "MemoryDenyWriteExecute": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet": "",
        "IPAddressAllow": "localhost",
        "IPAddressDeny": "any",
        "PrivateDevices": "yes",
    }
    for key, value in expected.items():
        assert found.get(key) == [value], (key, found.get(key))
    assert found["ProtectHome"][0] in ("yes", "tmpfs")
    assert found["ReadOnlyPaths"] == [str(bundle.resolve())]
    assert "CPUAffinity" not in found and "LoadCredential" not in found and "DeviceAllow" not in found
    words = found["ExecStart"][0].split()
    assert words[:5] == [sys.executable, "-m", "edgellm", "serve", str(bundle.resolve())]
    assert words[words.index("--host") + 1] == "127.0.0.1" and words[words.index("--context") + 1] == "512"
    assert int(found["TimeoutStopSec"][0]) > 20  # longer than the server's grace period


def test_memory_max_is_the_estimate_plus_the_server_and_headroom_unless_the_board_says(bundle):
    manifest = read_manifest(bundle)
    needed = estimate(manifest, ServiceOptions().backend or "onnxruntime", 512, 128).total
    found = directives(render_unit(bundle, context=512, backend="onnxruntime"))
    assert found["MemoryMax"] == [f"{math.ceil((needed + SERVER_OVERHEAD) * MEMORY_HEADROOM / MIB)}M"]
    board = directives(render_unit(bundle, board={"service": {"memory_max": "1G", "cpu_affinity": "4-7"}}))
    assert board["MemoryMax"] == ["1024M"] and board["CPUAffinity"] == ["4-7"]
    npu = directives(
        render_unit(
            bundle, device_allow=["/dev/fastrpc-cdsp rw", "/dev/dri/renderD128 rw"], supplementary_groups=["render"]
        )
    )
    assert npu["DeviceAllow"] == ["/dev/fastrpc-cdsp rw", "/dev/dri/renderD128 rw"]
    assert (
        npu["PrivateDevices"] == ["no"] and npu["PrivateUsers"] == ["no"] and npu["SupplementaryGroups"] == ["render"]
    )


def test_a_service_settings_toml_gives_overrides_and_flags_beat_it(bundle, tmp_path):
    profile = tmp_path / "my-board.toml"
    profile.write_text('[service]\ncpu_affinity = "4-7"\nthreads = 4\nport = 8081\n')
    assert load_board(profile) == {"cpu_affinity": "4-7", "threads": 4, "port": 8081}
    found = directives(render_unit(bundle, board=profile, port=9090))
    assert found["CPUAffinity"] == ["4-7"]
    assert "--threads 4" in found["ExecStart"][0] and "--port 9090" in found["ExecStart"][0]
    with pytest.raises(InvalidSettingError, match="known: host"):
        render_unit(bundle, board={"service": {"big_cores": 4}})
    with pytest.raises(InvalidSettingError, match="unknown board 'no-such-board'"):
        load_board("no-such-board")
    with pytest.raises(InvalidSettingError, match="cpu_affinity"):
        ServiceOptions(cpu_affinity="big cores")


def test_an_api_key_reaches_the_dynamic_user_as_a_credential(bundle):
    found = directives(render_unit(bundle, api_key_file="/etc/edgellm/api-key"))
    assert found["LoadCredential"] == ["edgellm-api-key:/etc/edgellm/api-key"]
    assert found["ExecStart"][0].endswith("--api-key-file %d/edgellm-api-key")


def test_paths_under_home_are_bound_read_only_into_an_empty_home(tmp_path):
    text = "ProtectHome=@P@\nBindReadOnlyPaths=@B@\nDeviceAllow=@D@\n"
    assert fill_template(text, {"P": "yes", "B": "", "D": []}) == "ProtectHome=yes\n"
    assert fill_template(text, {"P": "tmpfs", "B": "/home/pi/venv", "D": ["a rw", "b r"]}) == (
        "ProtectHome=tmpfs\nBindReadOnlyPaths=/home/pi/venv\nDeviceAllow=a rw\nDeviceAllow=b r\n"
    )
    with pytest.raises(EdgeLLMError, match="unknown placeholder"):
        fill_template("X=@NOPE@", {})


def test_install_writes_the_unit_and_says_what_to_run_and_uninstall_removes_it(bundle, tmp_path):
    unit_path = tmp_path / "system" / "edgellm.service"
    dry = install(bundle, dry_run=True, unit_path=unit_path, context=512)
    assert not unit_path.exists() and "[Service]" in dry.unit_text and "dry run" in dry.message
    done = install(bundle, unit_path=unit_path, context=512)
    assert unit_path.read_text() == done.unit_text
    assert stat.S_IMODE(unit_path.stat().st_mode) == 0o644
    for command in ("systemctl daemon-reload", "systemctl enable --now edgellm.service", "journalctl -u"):
        assert command in done.message
    wants = unit_path.parent / "multi-user.target.wants"
    wants.mkdir()
    (wants / "edgellm.service").symlink_to(unit_path)
    message = uninstall(unit_path)
    assert not unit_path.exists() and not (wants / "edgellm.service").is_symlink()
    assert "systemctl daemon-reload" in message
    with pytest.raises(EdgeLLMError, match="nothing to uninstall"):
        uninstall(unit_path)


def test_install_warns_when_the_dynamic_user_cannot_read_the_bundle(bundle, tmp_path):
    private = tmp_path / "private"
    shutil.copytree(bundle, private / "bundle")
    private.chmod(0o700)
    (private / "bundle" / "weights.bin").chmod(0o600)
    try:
        problems = unreadable_by_service([private / "bundle"])
        assert any("is not searchable by other users (chmod o+x" in p for p in problems)  # private, or an ancestor
        assert any("weights.bin" in p and "chmod o+r" in p for p in problems)
        message = install(private / "bundle", dry_run=True, context=512).message
        assert "warning:" in message and "chmod" in message
    finally:
        private.chmod(0o755)


@pytest.mark.system
@needs_systemd_analyze
@pytest.mark.skipif(
    platform.machine() != "x86_64" or not Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h").exists(),
    reason="the BPF rendering of the unit's policy is written for x86-64 (needs linux-libc-dev)",
)
@pytest.mark.parametrize("backend", CPU_BACKENDS)  # npu needs NPU graphs and QNN: not this bundle
def test_the_server_runs_inside_the_units_syscall_sandbox_with_memory_deny_write_execute(bundle, tmp_path, backend):
    try:
        import edgellm

        edgellm.load(bundle, context_length=64, backend=backend).close()
    except EdgeLLMError as error:
        pytest.skip(f"backend {backend} is not available here: {error}")
    policy = unit_syscall_policy(render_unit(bundle, context=512))
    assert policy["mdwe"] and "mmap" in policy["allowed"] and "setuid" not in policy["allowed"]
    with start_server(bundle, tmp_path, sandbox=policy, settings={"backend": backend}) as server:
        client = server.client()
        reply = client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0
        )
        streamed = list(client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=8, stream=True))
        assert reply.usage.completion_tokens >= 1 and streamed
        assert server.terminate() == 0
    assert "Operation not permitted" not in server.log()
