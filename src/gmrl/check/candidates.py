"""Expected meta-gradients of the known explanations, mirroring the user's sampling structure.

A user's MAML/LIRPG meta-gradient code (Finn et al. 2017; Zheng et al. 2018) draws, for each inner
step k = 0..K-1, one batch τ_k of n_k episodes at θ̂_k and sets

    θ̂_{k+1} = θ̂_k + α ∇_θ L(θ̂_k; τ_k),                                              (1)

differentiating through (1) (autodiff with `create_graph=True`), so the step's value ĝ_k AND its
Jacobian I + α ∇²L(θ̂_k; τ_k) come from the SAME batch; then a fresh batch at θ̂_K gives the outer
objective, and the estimate is ĝ = d/dφ L_out(θ̂_K(φ); τ_K). Given θ̂_K the outer batch is
independent of the inner ones, and every unbiased policy gradient has E[∇L_out | θ̂_K] = ∇J_T(θ̂_K),
so each explanation's expectation is (tower rule, the outer ingredient replaced by its conditional
expectation — which removes its variance from the Monte-Carlo estimate and changes no expectation)

    E[ĝ] = E_{τ_0..τ_{K-1}} [ (dθ̂_K/dφ)ᵀ ∇J_T(θ̂_K) ],                                   (2)

J_T the T-step objective the episodes estimate (no bootstrap; `tabular.finite_horizon_return`).
Only the inner steps are sampled, with the user's recorded sample sizes n_k. The explanations
differ in L and hence in the joint law of (ĝ_k, Ĥ_k) that enters (2) (Liu, Feng et al. 2022, §3–4:
compositional bias, which depends on the step noise, and Hessian-estimation bias):

  second-order-unbiased  L = DiCE Σ_t γ^t w_t r_t, or Loaded DiCE Σ_t γ^t (w_t − w_{t−1}) A_t with
                         A_t = G_t − V(s_t): E[∇²L] = ∇²J_T; E[ĝ] − g* is the compositional bias
                         only (it depends on each estimator's variance, hence both)
  first-order            the Jacobian is dropped: maml E[ĝ] = E[∇J_T(θ̂_K)] with the step noise of
                         DiCE or of a baselined gradient; lirpg E[ĝ] = 0 (φ enters only through the
                         derivative of the steps)
  vanilla-logprob-hessian L = Σ_t γ^t A_t log π_θ(a_t|s_t) with A_t = G_t (reward-to-go) or
                         G_t − V(s_t): E[∇²L] = E[Σ_t γ^t A_t ∇² log π_t], the score outer-product
                         terms missing (and the baseline does change it, since ∇² log π(a|s) does not
                         depend on a for a softmax)
  lvc-hessian            L = Σ_t γ^t (ρ_t − 1) A_t (Rothfuss et al. 2019), both advantages again

For lirpg the θ-gradients of vanilla log-prob and LVC equal DiCE's (or, with the baseline, Loaded
DiCE's) for every φ, so their meta-gradients coincide with second-order-unbiased sample by sample:
they are not separate explanations there. The baseline V is the exact V_θ of the inner reward,
without noise or gradient. A step drawn from two batches (two sample calls at the same θ̂_k) takes
its value from the first and its Jacobian from the second.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gmrl import estimators as est
from gmrl.core import straight_through
from gmrl.envs import tabular

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Variant:
    """One representative of an explanation: the surrogate L of the inner steps and its advantage.

    `surrogate` ∈ estimators.SAMPLED_ESTIMATORS; `baseline`: A_t = G_t − V(s_t) (True) or the
    reward-to-go G_t (False); `second_order`: the Jacobian of the steps is kept (False: first-order).
    """

    label: str
    surrogate: str
    baseline: bool
    second_order: bool = True

    @property
    def name(self) -> str:
        adv = "V-baseline" if self.baseline else "reward-to-go"
        return f"{self.label}[{self.surrogate}, {adv}]"


def variants(problem: str) -> list[Variant]:
    """The built-in explanations (see the module docstring) plus every registered surrogate."""
    out = [Variant("second-order-unbiased", "dice", False),
           Variant("second-order-unbiased", "loaded", True),
           Variant("first-order", "dice", False, second_order=False)]
    if problem == "maml":
        out += [Variant("first-order", "loaded", True, second_order=False),
                Variant("vanilla-logprob-hessian", "maml", False),
                Variant("vanilla-logprob-hessian", "maml", True),
                Variant("lvc-hessian", "lvc", False),
                Variant("lvc-hessian", "lvc", True)]
    for name, entry in est.registered().items():
        out.append(Variant(name, name, entry.uses_critic))
    return out


@dataclasses.dataclass(frozen=True)
class Structure:
    """The user's sampling structure: per inner step the sizes of the batch that moves θ̂_k and of
    the batch whose derivative is the step's Jacobian (None: the same batch)."""

    value_sizes: tuple[int, ...]
    jacobian_sizes: tuple[int | None, ...]

    @property
    def steps(self) -> int:
        return len(self.value_sizes)


def _surrogate(traj: tabular.Trajectories, mdp: tabular.TabularMDP, theta: Array, reward: Array,
               variant: Variant) -> Array:
    """Mean of the variant's surrogate over the episodes `traj`, differentiable in θ and reward. []."""
    log_prob = jax.nn.log_softmax(theta, axis=-1)[traj.states, traj.actions]
    rewards = reward[traj.states, traj.actions]
    discounts = jnp.full(rewards.shape, mdp.gamma, rewards.dtype)
    if variant.baseline:
        values = lax.stop_gradient(tabular.state_values(mdp, theta, reward))[traj.states]
    else:
        values = jnp.zeros_like(rewards)
    advantages = jax.vmap(est.gae, in_axes=(0, 0, 0, None))(rewards, values, discounts, 0.0)
    per_episode = jax.vmap(lambda lp, r, a, d: est.surrogate(
        variant.surrogate, log_prob=lp, behaviour_log_prob=None, rewards=r, advantages=a,
        discounts=d))(log_prob, rewards, advantages, discounts)
    return jnp.mean(per_episode)


def sampled_meta_gradients(key, mdp: tabular.TabularMDP, phi: Array, problem: str, lr: float,
                           horizon: int, structure: Structure,
                           variants: Sequence[Variant]) -> Array:
    """One draw of (dθ̂_K/dφ)ᵀ ∇J_T(θ̂_K), eq. (2), for each variant. [S, A] -> [V, S, A].

    Step k's batches use the same key in every variant (common random numbers); at k = 0 every
    variant is at the same θ̂_0, so those episodes are sampled once and shared.
    """
    keys = jax.random.split(key, 2 * structure.steps)
    theta0 = phi if problem == "maml" else jnp.zeros_like(phi)
    sizes = [(structure.value_sizes[k], structure.jacobian_sizes[k]) for k in range(structure.steps)]

    def batches(k, theta):
        value_n, jac_n = sizes[k]
        value = tabular.sample_trajectories(keys[2 * k], mdp, theta, value_n, horizon)
        jac = None if jac_n is None else tabular.sample_trajectories(keys[2 * k + 1], mdp, theta,
                                                                     jac_n, horizon)
        return value, jac

    first = batches(0, theta0)

    def one(variant):
        def outer(phi):
            reward = mdp.R + phi if problem == "lirpg" else mdp.R
            theta = phi if problem == "maml" else jnp.zeros_like(phi)
            for k in range(structure.steps):
                value_batch, jac_batch = first if k == 0 else batches(k, theta)
                step = jax.grad(_surrogate, argnums=2)(value_batch, mdp, theta, reward, variant)
                if not variant.second_order:
                    theta = theta + lax.stop_gradient(lr * step)  # lirpg: no φ in θ̂_k at all
                elif jac_batch is None:
                    theta = theta + lr * step
                else:
                    jac = jax.grad(_surrogate, argnums=2)(jac_batch, mdp, theta, reward, variant)
                    theta = straight_through(theta + lr * step, theta + lr * jac)
            return tabular.finite_horizon_return(mdp, theta, horizon, None, mdp.R)

        return jax.grad(outer)(phi)

    return jnp.stack([one(v) for v in variants])


@functools.lru_cache(maxsize=8)
def _program(problem: str, lr: float, horizon: int, structure: Structure, variants: tuple):
    """jit(vmap over MDPs of vmap over draws of `sampled_meta_gradients`), built once per setting
    so that drawing more (another seed) does not compile again."""
    return jax.jit(jax.vmap(jax.vmap(
        lambda k, m, p: sampled_meta_gradients(k, m, p, problem, lr, horizon, structure, variants),
        in_axes=(0, None, None)), in_axes=(0, 0, 0)))


def expectations(mdps: tabular.TabularMDP, phis: Array, problem: str, lr: float, horizon: int,
                 structure: Structure, variants: Sequence[Variant], repeats: int, seed: int,
                 chunk: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """Monte-Carlo E[ĝ] of each variant per MDP and the variance of that mean, in float64.

    mdps stacked [M], phis [M, S, A]. Returns (mean [M, V, S·A], variance of the mean
    [M, V, S·A]) from `repeats` draws per MDP, vmapped over MDPs and draws and jitted (`chunk`
    draws per MDP at a time).
    """
    variants = tuple(variants)
    with jax.enable_x64(True):
        f = _program(problem, float(lr), horizon, structure, variants)
        count = phis.shape[0]
        total = np.zeros((count, len(variants), phis[0].size))
        total_sq = np.zeros_like(total)
        base = jax.random.key(seed)
        done = 0
        while done < repeats:
            size = min(chunk, repeats - done)
            keys = jax.vmap(lambda m, d=done, n=size: jax.vmap(lambda r: jax.random.fold_in(
                jax.random.fold_in(base, m), r))(d + jnp.arange(n)))(jnp.arange(count))
            draws = np.asarray(f(keys, mdps, phis)).reshape(count, size, len(variants), -1)
            total += draws.sum(1)
            total_sq += (draws**2).sum(1)
            done += size
        mean = total / repeats
        var = np.maximum(total_sq / repeats - mean**2, 0.0) * repeats / (repeats - 1)
    return mean, var / repeats


def structure_from_calls(groups: Sequence[Sequence[int]], steps: int) -> tuple[Structure, list[str]]:
    """The sampling structure from the sizes of the sample calls grouped by the θ they were made at.

    Expected: K + 1 groups (one per inner step, then the outer one). A group of one call is a
    shared batch; of two, separate value and Jacobian batches (first, second). Returns (structure,
    notes on anything that did not fit and how it was read).
    """
    notes: list[str] = []
    inner = [list(g) for g in groups[:-1]] if len(groups) > 1 else []
    if len(groups) != steps + 1:
        notes.append(f"the sample calls were made at {len(groups)} distinct parameter tables, not "
                     f"K + 1 = {steps + 1} (one per inner step and one for the outer objective); "
                     "the candidates assume one shared batch per step of the first call's size")
        first = groups[0][0] if groups and groups[0] else 1
        return Structure((first,) * steps, (None,) * steps), notes
    value, jac = [], []
    for k, sizes in enumerate(inner):
        if len(sizes) == 1:
            value.append(sizes[0])
            jac.append(None)
        elif len(sizes) == 2:
            value.append(sizes[0])
            jac.append(sizes[1])
        else:
            notes.append(f"inner step {k} drew {len(sizes)} batches at the same θ; the candidates "
                         f"treat them as one shared batch of {sum(sizes)} episodes")
            value.append(sum(sizes))
            jac.append(None)
    return Structure(tuple(value), tuple(jac)), notes
