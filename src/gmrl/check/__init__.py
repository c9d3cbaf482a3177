"""Put anyone's meta-gradient code under the exact oracle and say what is wrong with it.

`gmrl.check(fn, ...)` (this module is callable) or `gmrl.check.check(fn, ...)`: see `run.check`;
the protocol `fn(task, rng)` is in `task`; the candidate explanations in `candidates`; the tests
in `diagnosis`; LOLA on the iterated prisoner's dilemma in `lola` (`check_lola`).
"""

from __future__ import annotations

import sys
import types

from gmrl.check.diagnosis import Diagnosis, Test
from gmrl.check.run import CheckResult, check, jax_function
from gmrl.check.task import Episodes, JaxTask, Task

__all__ = ["check", "check_lola", "jax_function", "CheckResult", "Diagnosis", "Test", "Task",
           "JaxTask", "Episodes"]


def __getattr__(name):
    if name in ("check_lola", "LolaCheckResult", "Game"):
        from gmrl.check import lola

        return getattr(lola, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    """`gmrl.check(fn, ...)` calls `check(fn, ...)`; the module stays importable as a package."""

    def __call__(self, *args, **kwargs):
        return check(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
