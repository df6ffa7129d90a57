"""Where the runtime's work runs: the CPUs its threads may use and the native kernel variant.

Both come from the board profile (RuntimeSettings.cpu_affinity, .kernel_ceiling) and are applied when
a backend is made, before it starts its threads: threads inherit the affinity of the thread that
creates them, so the native pool and ONNX Runtime's pool both stay on the chosen CPUs.
"""

from __future__ import annotations

import os
import platform

from edgellm.backends.native import ffi as native
from edgellm.boards.profile import capped_variant
from edgellm.errors import InvalidSettingError
from edgellm.units import parse_cpu_list


def pin_process(cpu_list: str) -> frozenset[int]:
    """Restrict every thread of this process (and the threads it starts later) to `cpu_list`."""
    cpus = parse_cpu_list(cpu_list, "cpu_affinity")
    if not hasattr(os, "sched_setaffinity"):  # not Linux: nothing to pin with; the board is Linux
        return cpus
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        raise InvalidSettingError(
            f"cpu_affinity {cpu_list!r} names CPUs this process cannot use: {sorted(cpus - allowed)}",
            f"CPUs available here: {sorted(allowed)}; pass --board for this machine or EDGELLM_BOARD=none",
        )
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:  # a thread that ended meanwhile
            pass
    return cpus


def cap_kernel_variant(ceiling: str) -> str | None:
    """Switch the native kernels to the best variant at or under `ceiling`, unless EDGELLM_KERNELS
    chose one. Returns the variant switched to (None: no change)."""
    if os.environ.get("EDGELLM_KERNELS"):
        return None
    chosen = capped_variant(native.available_variants(), ceiling, platform.machine())
    if chosen is None or chosen == native.kernel_variant():
        return None
    native.set_variant(chosen)
    return chosen
