"""The number of JAX CPU devices, fixed once per process before JAX starts its backend.

JAX reads `jax_num_cpu_devices` when it creates the CPU backend (at the first array or
computation) and never again, so this must run before any JAX work: `gmrl`'s commands call it
first thing; scripts call it right after their imports. It never resets a running backend.
"""

from __future__ import annotations

import os

from gmrl.errors import require

CPU_DEVICES_HELP = ("CPU devices to split the seeds across (one per core; results agree to float32 "
                    "rounding). Default: 2 on a machine with >= 2 cores, unless JAX_NUM_CPU_DEVICES "
                    "is set; 1 keeps JAX's defaults.")


def default_cpu_devices() -> int:
    """2 where the machine has at least 2 cores, else 1."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def use_cpu_devices(count: int | None = None) -> int | None:
    """Ask JAX for `count` CPU devices (None: `default_cpu_devices()`, or JAX_NUM_CPU_DEVICES when
    that variable is set). Returns the count requested, or None where it was left to JAX.

    Call before any JAX computation. If JAX's backend is already running, an explicit `count`
    that differs from the devices it has raises InputError (the backend is never reset: arrays
    made before would become invalid); a default count is then left as it is.
    """
    require(count is None or count >= 1, f"--cpu-devices must be >= 1, got {count}")
    explicit = count is not None
    if count is None:
        if "JAX_NUM_CPU_DEVICES" in os.environ:
            return None
        count = default_cpu_devices()
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # the backend is running: keep it as it is
        have = len(jax.devices("cpu"))
        require(have == count or not explicit,
                f"--cpu-devices {count}: JAX already started with {have} CPU device(s) in this "
                "process; set the device count before any JAX computation (or use "
                f"--cpu-devices {have})")
        return have
    return count
