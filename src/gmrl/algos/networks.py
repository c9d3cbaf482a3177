"""Actor-critic networks as pure functions of explicit parameter pytrees.

Three torsos, chosen by the observation shape:

- vector observations [..., D] (CartPole): separate actor and critic MLPs, 2 × 64 tanh units;
- small images [..., H, W, C] (MinAtar, 10 × 10): one 3×3 conv with 16 channels (VALID) and a
  128-unit ReLU layer shared by both heads, as in the MinAtar network (Young & Tian 2019);
- Atari frames [..., 84, 84, C]: the Nature DQN torso (Mnih et al. 2015; the reference's
  `CNNBase`): 8×8 stride 4 → 32, 4×4 stride 2 → 64, 3×3 stride 1 → 64, dense 512, ReLU, on pixels
  / 255, shared by both heads.

The critic takes the discount γ as an input (Xu et al. 2018, "Meta-Gradient Reinforcement
Learning", §2), in one of three ways (`critic`):

- "embedding": a linear 16-d embedding e(γ), then a ReLU mixing layer [features, e(γ)] → F and
  the value head F → 1 (the reference's `CNNBase_condition`: 512 + 16 = 528 → 512 on the Nature
  torso; here F is the torso's width: 128 + 16 → 128 for MinAtar, 64 + 16 → 64 for the MLP);
- "column": the value head sees [features, γ] (γ one raw input of the last layer);
- "none": no γ input (the reference's plain A2C `CNNBase`).

The MinAtar 3×3 conv is written as patch extraction plus one matrix multiply, which
differentiates much faster inside `lax.scan` on CPU than a library conv (5–15× measured on CPU;
`tests/test_mgrl.py` checks it equals `lax.conv`).
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
GAMMA_EMBEDDING = 16
NATURE_HIDDEN = 512
NATURE_LAYERS = ((8, 4, 32), (4, 2, 64), (3, 1, 64))  # (kernel, stride, channels)
CRITIC_INPUTS = ("embedding", "column", "none")


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


def _critic_init(key: Array, width: int, critic: str) -> Params:
    """Critic head parameters on F = width torso features (see the module docstring)."""
    if critic not in CRITIC_INPUTS:
        raise ValueError(f"unknown critic input {critic!r}; allowed: {', '.join(CRITIC_INPUTS)}")
    keys = jax.random.split(key, 3)
    if critic == "column":
        return {"value_head": _dense(keys[0], width + 1, 1, 1.0)}
    head = {"value_head": _dense(keys[0], width, 1, 1.0)}
    if critic == "embedding":
        head["gamma_embedding"] = _dense(keys[1], 1, GAMMA_EMBEDDING, 1.0)
        head["mix"] = _dense(keys[2], width + GAMMA_EMBEDDING, width, math.sqrt(2.0))
    return head


def _critic_apply(params: Params, features: Array, gamma: Array) -> Array:
    """V(s; γ) from torso features [..., F] and a scalar γ: [..., F] -> [...]."""
    if "mix" in params:
        gamma = jnp.broadcast_to(jnp.asarray(gamma, features.dtype), features.shape[:-1] + (1,))
        embedded = _apply_dense(params["gamma_embedding"], gamma)
        features = jax.nn.relu(_apply_dense(params["mix"],
                                            jnp.concatenate([features, embedded], axis=-1)))
    elif params["value_head"]["w"].shape[0] == features.shape[-1] + 1:
        features = _gamma_column(features, gamma)
    return _apply_dense(params["value_head"], features)[..., 0]


def mlp_network(obs_dim: int, num_actions: int, hidden: int = MLP_HIDDEN,
                critic: str = "column") -> Network:
    """Separate actor and critic MLPs (two tanh layers each) for observations [..., obs_dim]."""
    sqrt2 = math.sqrt(2.0)

    def init(key: Array) -> Params:
        keys = jax.random.split(key, 6)
        return {
            "actor": [_dense(keys[0], obs_dim, hidden, sqrt2), _dense(keys[1], hidden, hidden, sqrt2)],
            "policy_head": _dense(keys[2], hidden, num_actions, 0.01),
            "critic": [_dense(keys[3], obs_dim, hidden, sqrt2),
                       _dense(keys[4], hidden, hidden, sqrt2)],
            **_critic_init(keys[5], hidden, critic),
        }

    def torso(layers: list[Params], obs: Array) -> Array:
        x = obs.astype(layers[0]["w"].dtype)
        for layer in layers:
            x = jnp.tanh(_apply_dense(layer, x))
        return x

    def policy(params: Params, obs: Array) -> Array:
        return _apply_dense(params["policy_head"], torso(params["actor"], obs))

    def apply(params: Params, obs: Array, gamma: Array) -> tuple[Array, Array]:
        return policy(params, obs), _critic_apply(params, torso(params["critic"], obs), gamma)

    return Network(init, policy, apply)


def conv3x3_valid(x: Array, layer: Params) -> Array:
    """3×3 VALID convolution as patches @ weight: [..., H, W, C] -> [..., H-2, W-2, C_out].

    The weight has shape [9 C, C_out] with patch order (row offset, column offset, channel).
    """
    height, width = x.shape[-3], x.shape[-2]
    patches = [x[..., i:i + height - 2, j:j + width - 2, :] for i in range(3) for j in range(3)]
    return jnp.concatenate(patches, axis=-1) @ layer["w"] + layer["b"]


def conv_network(obs_shape: tuple[int, int, int], num_actions: int,
                 critic: str = "column") -> Network:
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
            **_critic_init(keys[3], CONV_HIDDEN, critic),
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
        return logits, _critic_apply(params, features, gamma)

    return Network(init, policy, apply)


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


def nature_network(obs_shape: tuple[int, int, int], num_actions: int,
                   critic: str = "column") -> Network:
    """Nature DQN torso (Mnih et al. 2015) on [..., H, W, C] pixels in [0, 255] (divided by 255):
    conv 8×8/4 → 32, 4×4/2 → 64, 3×3/1 → 64 (VALID, ReLU), dense 512 (ReLU), shared by both heads.
    For 84 × 84 inputs the last conv map is 7 × 7 × 64 = 3136."""
    height, width, channels = obs_shape
    for kernel, stride, _ in NATURE_LAYERS:
        height, width = _conv_out(height, kernel, stride), _conv_out(width, kernel, stride)
    flat = height * width * NATURE_LAYERS[-1][2]
    sqrt2 = math.sqrt(2.0)

    def init(key: Array) -> Params:
        keys = jax.random.split(key, len(NATURE_LAYERS) + 3)
        convs, c_in = [], channels
        for k, (kernel, _, c_out) in zip(keys, NATURE_LAYERS, strict=False):
            weight = jax.nn.initializers.orthogonal(sqrt2, column_axis=-1)(
                k, (kernel, kernel, c_in, c_out), jnp.float32)
            convs.append({"w": weight, "b": jnp.zeros((c_out,), jnp.float32)})
            c_in = c_out
        return {"convs": convs, "hidden": _dense(keys[-3], flat, NATURE_HIDDEN, sqrt2),
                "policy_head": _dense(keys[-2], NATURE_HIDDEN, num_actions, 0.01),
                **_critic_init(keys[-1], NATURE_HIDDEN, critic)}

    def torso(params: Params, obs: Array) -> Array:
        batch_shape = obs.shape[:-3]
        x = obs.astype(jnp.float32).reshape((-1,) + obs.shape[-3:]) / 255.0
        for layer, (_, stride, _) in zip(params["convs"], NATURE_LAYERS, strict=True):
            x = jax.lax.conv_general_dilated(x, layer["w"], (stride, stride), "VALID",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            x = jax.nn.relu(x + layer["b"])
        x = x.reshape(batch_shape + (flat,))
        return jax.nn.relu(_apply_dense(params["hidden"], x))

    def policy(params: Params, obs: Array) -> Array:
        return _apply_dense(params["policy_head"], torso(params, obs))

    def apply(params: Params, obs: Array, gamma: Array) -> tuple[Array, Array]:
        features = torso(params, obs)
        return _apply_dense(params["policy_head"], features), _critic_apply(params, features, gamma)

    return Network(init, policy, apply)


ATARI_MIN_SIZE = 36  # the Nature torso needs H, W >= 36 (one 1 × 1 map after the three convs)


def make_network(obs_shape: tuple[int, ...], num_actions: int, critic: str = "column") -> Network:
    """An MLP for vector observations; for [H, W, C] images the MinAtar conv net, or the Nature
    torso when H, W >= 36 (Atari frames are 84 × 84). `critic`: how the critic sees γ."""
    if len(obs_shape) == 1:
        return mlp_network(obs_shape[0], num_actions, critic=critic)
    if len(obs_shape) == 3 and min(obs_shape[:2]) >= ATARI_MIN_SIZE:
        return nature_network(tuple(obs_shape), num_actions, critic)
    if len(obs_shape) == 3:
        return conv_network(tuple(obs_shape), num_actions, critic)
    raise ValueError(f"observations must be vectors [D] or images [H, W, C], got shape {obs_shape}")
