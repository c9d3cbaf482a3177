"""Checkpoints of a seed-stacked training state through flax.serialization (msgpack).

PRNG key arrays are stored as their raw key data and re-wrapped with the template's key
implementation. The file is replaced atomically, so a run killed while saving keeps the previous
checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gmrl.errors import InputError
from gmrl.io import atomic_write_bytes


def _is_key(x) -> bool:
    import jax

    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def save(path: Path, state: Any, steps_done: int) -> Path:
    """Write {state, steps_done} to `path`."""
    import jax
    import numpy as np
    from flax import serialization

    plain = jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if _is_key(x) else x), state)
    data = serialization.to_bytes({"steps_done": np.int64(steps_done), "state": plain})
    return atomic_write_bytes(path, data)


def restore(path: Path, template: Any) -> tuple[Any, int]:
    """(state, steps_done) from `path`, with the structure, shapes and dtypes of `template`."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import serialization

    plain_template = jax.tree.map(
        lambda x: np.asarray(jax.random.key_data(x) if _is_key(x) else x), template)
    mismatch = (f"checkpoint {path} does not match this configuration; delete it to start the run "
                "afresh")
    try:
        restored = serialization.from_bytes({"steps_done": np.int64(0), "state": plain_template},
                                            Path(path).read_bytes())
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{mismatch} ({err})") from None

    def back(like, value):
        value = np.asarray(value)
        if _is_key(like):
            return jax.random.wrap_key_data(jnp.asarray(value), impl=jax.random.key_impl(like))
        if value.shape != like.shape:
            raise InputError(f"{mismatch} (an array of shape {value.shape}, expected {like.shape})")
        return jnp.asarray(value, like.dtype)

    state = jax.tree.map(back, template, restored["state"])
    return state, int(restored["steps_done"])
