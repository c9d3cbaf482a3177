"""gmrl: estimate, diagnose and correct meta-gradients in gradient-based meta-RL (JAX)."""

__version__ = "0.1.0"


def __getattr__(name):
    """`gmrl.check(fn, ...)` and `gmrl.check_lola(fn, ...)` without importing JAX at `import gmrl`
    (the module `gmrl.check` is callable)."""
    if name in ("check", "check_lola"):
        import importlib

        module = importlib.import_module("gmrl.check")
        return module if name == "check" else module.check_lola
    raise AttributeError(f"module 'gmrl' has no attribute {name!r}")
