"""gmrl: estimate, diagnose and correct meta-gradients in gradient-based meta-RL (JAX)."""

__version__ = "0.1.0"


def __getattr__(name):
    """`gmrl.check(fn, ...)` without importing JAX at `import gmrl` (the module is callable)."""
    if name == "check":
        import importlib

        return importlib.import_module("gmrl.check")
    raise AttributeError(f"module 'gmrl' has no attribute {name!r}")
