"""Actor-critic networks as pure functions of explicit parameter pytrees.

Two families, chosen by the observation rank:

- vector observations [..., D] (CartPole): separate actor and critic MLPs, 2 × 64 tanh units;
- image observations [..., 10, 10, C] (MinAtar): one 3×3 conv with 16 channels (VALID) and a 128-unit
  ReLU layer shared by both heads, as in the MinAtar reference network (Young & Tian 2019).

The critic takes the discount γ as an input (Xu et al. 2018, "Meta-Gradient Reinforcement
Learning", §2): its head sees [features, γ]. The 3×3 conv is written as patch extraction plus one
matrix multiply, which differentiates much faster inside `lax.scan` on CPU than a library conv
(5–15× measured on CPU; `tests/test_mgrl.py` checks it equals `lax.conv`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
Params = dict[str, Any]

MLP_HIDDEN = 64
CONV_CHANNELS = 16
CONV_HIDDEN = 128


class Network(NamedTuple):
    """`init(key) -> params`; `policy(params, obs) -> logits [..., A]`;
    `apply(params, obs, gamma) -> (logits [..., A], values [...])` (gamma a scalar)."""

    init: Callable[[Array], Params]
    policy: Callable[[Params, Array], Array]
    apply: Callable[[Params, Array, Array], tuple[Array, Array]]


def _dense(key: Array, n_in: int, n_out: int, scale: float) -> Params:
    weight = jax.nn.initializers.orthogonal(scale)(key, (n_in, n_out), jnp.float32)
    return {"w": weight, "b": jnp.zeros((n_out,), jnp.float32)}


def _apply_dense(layer: Params, x: Array) -> Array:
    return x @ layer["w"] + layer["b"]


def _gamma_column(features: Array, gamma: Array) -> Array:
    """Append γ as one more input feature: [..., F] -> [..., F + 1]."""
    gamma = jnp.broadcast_to(jnp.asarray(gamma, features.dtype), features.shape[:-1] + (1,))
    return jnp.concatenate([features, gamma], axis=-1)


def mlp_network(obs_dim: int, num_actions: int, hidden: int = MLP_HIDDEN) -> Network:
    """Separate actor and critic MLPs (two tanh layers each) for observations [..., obs_dim]."""
    sqrt2 = math.sqrt(2.0)

    def init(key: Array) -> Params:
        keys = jax.random.split(key, 6)
        return {
            "actor": [_dense(keys[0], obs_dim, hidden, sqrt2), _dense(keys[1], hidden, hidden, sqrt2)],
            "policy_head": _dense(keys[2], hidden, num_actions, 0.01),
            "critic": [_dense(keys[3], obs_dim, hidden, sqrt2),
                       _dense(keys[4], hidden, hidden, sqrt2)],
            "value_head": _dense(keys[5], hidden + 1, 1, 1.0),
        }

    def torso(layers: list[Params], obs: Array) -> Array:
        x = obs.astype(layers[0]["w"].dtype)
        for layer in layers:
            x = jnp.tanh(_apply_dense(layer, x))
        return x

    def policy(params: Params, obs: Array) -> Array:
        return _apply_dense(params["policy_head"], torso(params["actor"], obs))

    def apply(params: Params, obs: Array, gamma: Array) -> tuple[Array, Array]:
        features = _gamma_column(torso(params["critic"], obs), gamma)
        return policy(params, obs), _apply_dense(params["value_head"], features)[..., 0]

    return Network(init, policy, apply)


def conv3x3_valid(x: Array, layer: Params) -> Array:
    """3×3 VALID convolution as patches @ weight: [..., H, W, C] -> [..., H-2, W-2, C_out].

    The weight has shape [9 C, C_out] with patch order (row offset, column offset, channel).
    """
    height, width = x.shape[-3], x.shape[-2]
    patches = [x[..., i:i + height - 2, j:j + width - 2, :] for i in range(3) for j in range(3)]
    return jnp.concatenate(patches, axis=-1) @ layer["w"] + layer["b"]


def conv_network(obs_shape: tuple[int, int, int], num_actions: int) -> Network:
    """MinAtar network: conv 3×3×16 -> ReLU -> dense 128 -> ReLU, shared by both heads."""
    height, width, channels = obs_shape
    flat = (height - 2) * (width - 2) * CONV_CHANNELS
    sqrt2 = math.sqrt(2.0)

    def init(key: Array) -> Params:
        keys = jax.random.split(key, 4)
        return {
            "conv": _dense(keys[0], 9 * channels, CONV_CHANNELS, sqrt2),
            "hidden": _dense(keys[1], flat, CONV_HIDDEN, sqrt2),
            "policy_head": _dense(keys[2], CONV_HIDDEN, num_actions, 0.01),
            "value_head": _dense(keys[3], CONV_HIDDEN + 1, 1, 1.0),
        }

    def torso(params: Params, obs: Array) -> Array:
        x = jax.nn.relu(conv3x3_valid(obs.astype(params["conv"]["w"].dtype), params["conv"]))
        x = x.reshape(x.shape[:-3] + (flat,))
        return jax.nn.relu(_apply_dense(params["hidden"], x))

    def policy(params: Params, obs: Array) -> Array:
        return _apply_dense(params["policy_head"], torso(params, obs))

    def apply(params: Params, obs: Array, gamma: Array) -> tuple[Array, Array]:
        features = torso(params, obs)
        logits = _apply_dense(params["policy_head"], features)
        values = _apply_dense(params["value_head"], _gamma_column(features, gamma))[..., 0]
        return logits, values

    return Network(init, policy, apply)


def make_network(obs_shape: tuple[int, ...], num_actions: int) -> Network:
    """An MLP for vector observations, the MinAtar conv net for [H, W, C] images."""
    if len(obs_shape) == 1:
        return mlp_network(obs_shape[0], num_actions)
    if len(obs_shape) == 3:
        return conv_network(tuple(obs_shape), num_actions)
    raise ValueError(f"observations must be vectors [D] or images [H, W, C], got shape {obs_shape}")
