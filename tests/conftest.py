import atexit
import importlib.util
import os
import shutil
import tempfile

import jax
import pytest

# Compiled programs are shared between the tests and the `gmrl` subprocesses they start (each
# subprocess would compile the same programs again) through JAX's persistent cache, in a folder of
# this pytest process (one per xdist worker) that is removed at exit.
_CACHE = tempfile.mkdtemp(prefix="gmrl-test-jax-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# Without the rl extra (a core-only install: `pip install gmrl`), skip the modules that need it.
collect_ignore = [name for name, module in (("test_lola.py", "optax"), ("test_mgrl.py", "gymnax"),
                                            ("test_cli_runs.py", "optax"), ("test_check_lola.py", "optax"))
                  if importlib.util.find_spec(module) is None]


@pytest.fixture
def x64():
    """Run the test in float64 (oracles and anything compared against them)."""
    with jax.enable_x64(True):
        yield


def pytest_collection_modifyitems(config, items):
    """CI=true skips tests marked slow; each has a fast test covering the same property."""
    import os

    if os.environ.get("CI") == "true":
        skip = pytest.mark.skip(reason="slow; skipped when CI=true (a fast test covers it)")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)
