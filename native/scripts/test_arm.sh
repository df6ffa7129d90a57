#!/usr/bin/env bash
# Cross-compile the C test driver for aarch64 and run it under qemu user-mode emulation on three
# cores, proving both the results and the runtime dispatch:
#   cortex-a72  (Pi 4: no SDOT)      must pick neon    (any SDOT executed would die with SIGILL)
#   cortex-a76  (Pi 5, RK3588: SDOT) must pick dotprod
#   max         (SDOT and SMMLA)     must pick i8mm    (matmul on SMMLA, matvec on SDOT)
# and that EDGELLM_KERNELS=dotprod is refused on cortex-a72.
# Installs nothing: needs `apt-get install -y gcc-aarch64-linux-gnu qemu-user-static`.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
if [ ${#missing[@]} -gt 0 ]; then
    echo "error: missing ${missing[*]}; install with: apt-get install -y ${missing[*]}" >&2
    exit 1
fi

make -s CC=aarch64-linux-gnu-gcc CFLAGS="-O2 -Werror"
driver=build/aarch64-linux-gnu/test_kernels
run() { qemu-aarch64-static -cpu "$1" -L /usr/aarch64-linux-gnu "$driver"; }

passed=0 failed=0
for pair in cortex-a72:neon cortex-a76:dotprod max:i8mm; do
    cpu=${pair%%:*} want=${pair##*:}
    echo "== qemu-aarch64-static -cpu $cpu"
    log=$(mktemp)
    status=0
    run "$cpu" >"$log" 2>&1 || status=$?
    grep -v '^ok' "$log" || true  # the dispatch lines, failures and the summary
    got=$(sed -n 's/^dispatch: variant=\([a-z0-9]*\).*/\1/p' "$log")
    rm -f "$log"
    if [ "$status" -ne 0 ]; then
        echo "FAIL $cpu: the driver exited with $status$([ "$status" -eq 132 ] && echo ' (SIGILL)')"
        failed=$((failed + 1))
    elif [ "$got" != "$want" ]; then
        echo "FAIL $cpu: dispatch chose $got, expected $want"
        failed=$((failed + 1))
    else
        echo "ok   $cpu: dispatch chose $want and every check passed"
        passed=$((passed + 1))
    fi
done

echo "== EDGELLM_KERNELS=dotprod on cortex-a72"
status=0
out=$(EDGELLM_KERNELS=dotprod qemu-aarch64-static -cpu cortex-a72 -L /usr/aarch64-linux-gnu "$driver" 2>&1) || status=$?
echo "$out"
if [ "$status" -eq 2 ] && grep -q "refused" <<<"$out"; then
    echo "ok   a forced variant the CPU lacks is refused"
    passed=$((passed + 1))
else
    echo "FAIL EDGELLM_KERNELS=dotprod on cortex-a72 exited with $status"
    failed=$((failed + 1))
fi
echo "arm: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
