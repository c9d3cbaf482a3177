"""The two settings presets of A2C / MGRL / MGRL-LVC: `reference` (default) and `full`.

`reference` follows the reference MGRL code of Liu et al. 2022 (`mgrl/main_meta_condition_kl.py`,
`mgrl/main_baseline.py` and `mgrl/a2c_ppo_acktr`): inner optimiser Adam (α 7e-4, β 0.9/0.999,
ε 1e-8) with linear learning-rate decay to 0 over the run's total updates, gradients clipped to
norm 0.5 with PyTorch's formula; MGRL differentiates through the Adam state but holds the GAE
baseline values, the critic's γ input and the clipping norm constant (stop-gradient); the critic
sees γ through a 16-d linear embedding and a ReLU mixing layer; the A2C baseline's critic has no
γ input (the reference's plain `CNNBase`).

`full` is gmrl's exact-derivative variant: RMSProp (α 7e-4, decay 0.99, ε 1e-5 outside the square
root, as torch.optim.RMSprop; `scale_by_rmsprop`), no decay, optax's clipping; MGRL
differentiates every path (`HOLDABLE` none held) and the
critic takes γ as one raw input of its last layer. docs/mgrl.md tabulates every difference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gmrl.algos import meta_adam
from gmrl.errors import require

PRESETS = ("reference", "full")

HOLDABLE = ("baseline", "critic_gamma", "clip_norm")
"""Paths of the inner update that MGRL may hold constant in its meta-gradient: the GAE baseline
values V(s_t) (inside the advantages and value targets), the γ fed to the critic, and the global
norm inside the clipping factor."""

CRITIC_INPUTS = ("embedding", "column", "none")
"""How the critic sees γ: 16-d embedding + ReLU mixing layer, a raw input column, or not at all."""

TORCH_CLIP_DELTA = 1e-6  # torch.nn.utils.clip_grad_norm_: c / (‖g‖ + 1e-6)


def check(preset: str) -> None:
    require(preset in PRESETS, f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")


def held_paths(preset: str) -> tuple[str, ...]:
    """The inner-update paths the preset's meta-gradient holds constant."""
    return HOLDABLE if preset == "reference" else ()


def critic_input(preset: str, meta: bool) -> str:
    """The critic's γ input for MGRL (meta) or plain A2C under `preset`."""
    if preset == "reference":
        return "embedding" if meta else "none"
    return "column"


def base_optimizer(config) -> optax.GradientTransformation:
    """The inner optimiser without clipping: Adam (+ linear decay over config.total_updates when
    that is > 0) for `reference`, RMSProp for `full`."""
    if config.preset == "reference":
        return meta_adam.adam(meta_adam.linear_decay(config.learning_rate, config.total_updates),
                              eps=config.adam_eps)
    return optax.chain(scale_by_rmsprop(config.rms_decay, config.rms_eps),
                       optax.scale(-config.learning_rate))


def scale_by_rmsprop(decay: float, eps: float) -> optax.GradientTransformation:
    """RMSProp scaling (Tieleman & Hinton 2012) with ε outside the square root, as
    `torch.optim.RMSprop` computes it (the A2C of a2c_ppo_acktr):

        ν ← decay·ν + (1 − decay)·g²  (ν₀ = 0),   u = g / (√(ν + δ) + ε),   δ = (ε/1000)².

    δ only keeps the derivative of √ finite at ν = 0 (MGRL differentiates through ν, and a weight
    with an exactly zero gradient has ν = 0); it changes u by less than 0.1 %. With ε *inside* the
    root, g / √(ν + ε) (`optax.rmsprop`), and ε = 1e-5 the step shrinks to ≈ g/√ε wherever
    √ν ≪ √ε ≈ 3e-3: on the MinAtar network (median per-weight RMS gradient 7e-5) the median weight
    moved ~40× less, and A2C stalled at a return of 5.5 on Breakout-MinAtar
    (benchmarks/a2c_learning.py). The state is `optax.ScaleByRmsState` (leaves like the params).
    """
    eps_root = (eps / 1000.0) ** 2

    def init(params):
        return optax.ScaleByRmsState(nu=jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        nu = jax.tree.map(lambda g, n: decay * n + (1.0 - decay) * g * g, updates, state.nu)
        updates = jax.tree.map(lambda g, n: g / (jnp.sqrt(n + eps_root) + eps), updates, nu)
        return updates, optax.ScaleByRmsState(nu=nu)

    return optax.GradientTransformation(init, update)


def clip_delta(preset: str) -> float:
    """δ of the clipping factor min(1, c/(‖g‖ + δ)): PyTorch's 1e-6 (reference), 0 (optax, full)."""
    return TORCH_CLIP_DELTA if preset == "reference" else 0.0


def make_optimizer(config, hold_clip_norm: bool = False) -> optax.GradientTransformation:
    """Global-norm clipping (config.max_grad_norm) then the preset's inner optimiser."""
    return optax.chain(meta_adam.clip_by_global_norm(config.max_grad_norm, clip_delta(config.preset),
                                                     hold_clip_norm),
                       base_optimizer(config))
