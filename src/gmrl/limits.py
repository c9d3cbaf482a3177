"""Guards every command runs on its options before it allocates or writes anything.

- `require_memory`: an estimate in bytes (from the shapes the run will allocate) against the
  memory this machine has available, so that a huge size is one line naming the option and the
  largest value that fits, instead of an out-of-memory kill, traceback or XLA abort;
- `require_seed`: a PRNG seed within the range the PRNG accepts (`jax.random.key`: uint32 seeds
  are folded exactly; numpy's Generator any non-negative integer);
- `require_finite`: a float option that is a finite number (infinity and NaN make no sense as a
  learning rate, a coefficient or a discount).
"""

from __future__ import annotations

import math
import os

from gmrl.errors import require

SEED_MAX = 2**32 - 1
"""Largest --seed: `jax.random.key` takes a uint32 seed exactly; derived seeds (seed + i) stay
within int64, which every PRNG used here accepts."""
INT64_MAX = 2**63 - 1
MEMORY_FRACTION = 0.8
"""Share of the available memory one run may plan to use (the rest: Python, XLA, the OS)."""


def available_bytes() -> int:
    """Memory available to a new allocation now: MemAvailable of /proc/meminfo (Linux), else the
    physical memory; the GMRL_MEMORY_BYTES environment variable overrides both (tests)."""
    forced = os.environ.get("GMRL_MEMORY_BYTES")
    if forced:
        return int(forced)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        return 8 * 2**30


def require_memory(option: str, value: int, bytes_of, *, low: int = 1, what: str = "") -> None:
    """InputError unless `bytes_of(value)` (an estimate of what the run allocates, increasing in
    `value`) fits in `MEMORY_FRACTION` of the available memory; the message names `option` and
    the largest value that fits (found by bisection over `bytes_of`)."""
    budget = MEMORY_FRACTION * available_bytes()
    if bytes_of(value) <= budget:
        return
    lo, hi = low - 1, value  # bytes_of(lo) fits (or lo < low), bytes_of(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if bytes_of(mid) <= budget:
            lo = mid
        else:
            hi = mid
    fits = f"at most {lo} fits" if lo >= low else "no value fits with the other settings"
    require(False, f"{option} {value} needs about {_size(bytes_of(value))} of memory{what}, more than "
                   f"the {_size(budget)} this machine can give a run now; {fits}")


def require_sizes(sizes: dict[str, tuple[int, int]], bytes_of, low: int = 1, what: str = "") -> None:
    """`require_memory` over several size options at once.

    sizes: option -> (value given, default); bytes_of(values: dict option -> value) estimates
    the run's bytes. Nothing is raised when the run does not fit even with every size option at
    no more than its default (another setting is the cause: the caller's own check names it).
    The option blamed is the first that alone (the others at no more than their defaults) does
    not fit, else the one furthest above its default; its largest fitting value is found with
    the other options as given.
    """
    given = {name: value for name, (value, _) in sizes.items()}
    budget = MEMORY_FRACTION * available_bytes()
    if bytes_of(given) <= budget:
        return
    modest = {name: min(value, default) for name, (value, default) in sizes.items()}
    if bytes_of(modest) > budget:
        return  # the settings outside `sizes` are too large: the caller's own check names them
    blamed = next((name for name in sizes if bytes_of({**modest, name: given[name]}) > budget),
                  max(sizes, key=lambda n: sizes[n][0] / max(sizes[n][1], 1)))
    require_memory(blamed, given[blamed], lambda v: bytes_of({**given, blamed: v}), low=low,
                   what=what)


def require_seed(value: int, option: str = "--seed") -> None:
    """InputError unless 0 <= value <= SEED_MAX."""
    require(0 <= value <= SEED_MAX, f"{option} must be an integer in [0, {SEED_MAX}], got {value}")


def require_int64(value: int, option: str) -> None:
    """InputError unless `value` fits a signed 64-bit integer."""
    require(-INT64_MAX - 1 <= value <= INT64_MAX,
            f"{option} must fit a 64-bit integer (at most {INT64_MAX}), got {value}")


def require_finite(value: float | None, option: str, *, positive: bool = False,
                   nonnegative: bool = False) -> None:
    """InputError unless `value` is None or a finite float (and > 0 / >= 0 when asked)."""
    if value is None:
        return
    require(math.isfinite(value), f"{option} must be a finite number, got {value}")
    require(not positive or value > 0, f"{option} must be > 0, got {value}")
    require(not nonnegative or value >= 0, f"{option} must be >= 0, got {value}")


def _size(num_bytes: float) -> str:
    for unit, scale in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes / 2**10:.0f} kB"
