import importlib.util

import jax
import pytest

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
