"""The tabular MAML and LIRPG meta-problems, instances of `gmrl.core` (docs/design.md).

Problems (θ: policy logits [S, A]; φ: meta-parameters [S, A]):
  maml   θ_0 = φ;              J_in = J_out = J (reward R)
  lirpg  θ_0 = 0 (fixed);      J_in uses reward R + φ (intrinsic reward); J_out uses R
Inner update θ_{k+1} = θ_k + α ∇_θ J_in(θ_k); meta-gradient d/dφ J_out(θ_K(φ)).

`problem(cfg, mdp)` is the `core.MetaProblem`; the exact meta-gradient and the decomposed estimate
(Liu, Feng et al. 2022, "A Theoretical Understanding of Gradient Bias in Meta-Reinforcement
Learning", §4) are `core.unroll` with the configuration's three sources: `inner` (the step's value),
`hessian` (its Jacobian) and `outer`. α, the number of active steps K and the injected Hessian error
c may be traced (`core.Hyper`): the static `MetaGradConfig.steps` is then the loop length K_max.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from gmrl import core
from gmrl import estimators as est
from gmrl.core import Hyper, Source, masked_scan, step_keys, straight_through  # noqa: F401 (re-exported)
from gmrl.envs import tabular
from gmrl.errors import require

Array = jax.Array

PROBLEMS = ("maml", "lirpg")
ORACLES = ("infinite", "finite")


@dataclasses.dataclass(frozen=True)
class MetaGradConfig:
    """Everything that defines a (exact or estimated) K-step meta-gradient. Hashable: jit-static.

    steps K >= 1; lr α > 0; horizon T >= 1 of sampled trajectories (and of the finite oracle);
    noise: critic noise scale (reference: 1.0); loaded_lambda: Loaded DiCE λ; gae_lambda: λ of the
    advantage (1 gives G_t − V(s_t)); hessian_error: c of the injected Hessian error
    mean(θ² ⊙ E), E = c + 0.3·N(0, 1) per step (0 disables it); critic_gradient: the critic
    V_{sg θ}(R + φ) keeps its gradient in the reward table (the reference's LIRPG default; False
    holds it fixed, its `--detach_value_gradient`). The critic never carries a gradient in θ.
    """

    problem: str = "maml"
    steps: int = 1
    lr: float = 10.0
    horizon: int = 20
    noise: float = 1.0
    inner: Source = Source()
    hessian: Source = Source()
    outer: Source = Source()
    oracle: str = "infinite"
    loaded_lambda: float = 1.0
    gae_lambda: float = 1.0
    hessian_error: float = 0.0
    critic_gradient: bool = True

    def __post_init__(self):
        require(self.problem in PROBLEMS,
                f"unknown problem {self.problem!r}; allowed: {', '.join(PROBLEMS)}")
        require(self.oracle in ORACLES,
                f"unknown oracle {self.oracle!r}; allowed: {', '.join(ORACLES)}")
        _require_int(self.steps, "the number of inner steps K", 1, MAX_STEPS)
        _require_int(self.horizon, "the horizon T", 1, MAX_HORIZON)
        require(_finite(self.lr) and self.lr > 0, f"the inner learning rate must be > 0, got {self.lr}")
        require(_finite(self.noise) and self.noise >= 0,
                f"the critic noise must be >= 0, got {self.noise}")
        for name in ("loaded_lambda", "gae_lambda"):
            value = getattr(self, name)
            require(_finite(value) and 0 <= value <= 1, f"{name} must be in [0, 1], got {value}")
        require(_finite(self.hessian_error), f"hessian_error must be finite, got {self.hessian_error}")

    @property
    def parts(self) -> core.Decomposition:
        """The (value, jacobian, outer) sources of the decomposed estimate."""
        return core.Decomposition(self.inner, self.hessian, self.outer)


def _finite(x) -> bool:
    return isinstance(x, int | float) and x == x and abs(x) != float("inf")


MAX_STEPS, MAX_HORIZON = 1_000, 100_000


def _require_int(value, what: str, minimum: int, maximum: int | None = None) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
            f"{what} must be an integer >= {minimum}, got {value!r}")
    require(maximum is None or value <= maximum, f"{what} must be at most {maximum:,}, got {value:,}")


def estimate_bytes(cfg: MetaGradConfig, estimates: int) -> int:
    """A rough upper estimate of the memory `estimates` vmapped decomposed estimates need: about 200
    bytes per sampled (trajectory, time step) — indices, log-probs, rewards, critic values,
    advantages and their cotangents — for each of the 2K + 1 sampled ingredients."""
    per_step = sum(i.samples or 0 for i in (cfg.inner, cfg.hessian) if not i.is_exact)
    trajectories = cfg.steps * per_step + (0 if cfg.outer.is_exact else cfg.outer.samples or 0)
    return 200 * estimates * trajectories * cfg.horizon


THETA0_CHOICES = ("zeros", "normal")
"""θ0 of MAML's inner loop: `zeros` (the uniform policy, as in the reference study) or `normal`
(N(0, 1) per MDP from the seed); a user's [S, A] table is the third choice (`tabular.load_theta`)."""


def initial_meta_params(key: Array, mdp: tabular.TabularMDP, problem: str,
                        theta0: str | Array = "zeros") -> Array:
    """φ at which the meta-gradient is taken. [S, A].

    maml: φ = θ_0, which is `theta0`: "zeros", "normal" (N(0, 1) drawn from `key`) or an [S, A]
    table. lirpg: φ = 0 (no intrinsic reward); its inner loop always starts at θ_0 = 0, so any
    `theta0` other than "zeros" is refused.
    """
    shape, dtype = mdp.R.shape, mdp.R.dtype
    if isinstance(theta0, str):
        require(theta0 in THETA0_CHOICES,
                f"unknown theta0 {theta0!r}; allowed: {', '.join(THETA0_CHOICES)} or an [S, A] table")
    if problem == "lirpg":
        require(isinstance(theta0, str) and theta0 == "zeros",
                "LIRPG's inner loop starts at θ0 = 0 (φ is the intrinsic reward); theta0 must be 'zeros'")
        return jnp.zeros(shape, dtype)
    if isinstance(theta0, str):
        return jax.random.normal(key, shape, dtype) if theta0 == "normal" else jnp.zeros(shape, dtype)
    theta0 = jnp.asarray(theta0, dtype)
    require(theta0.shape == shape, f"theta0 must have shape [S, A] = {shape}, got {theta0.shape}")
    return theta0


def config_hyper(cfg: MetaGradConfig) -> Hyper:
    """The configuration's own α, K and c as a `Hyper`."""
    return Hyper(cfg.lr, cfg.steps, cfg.hessian_error)


def initial_theta(cfg: MetaGradConfig, phi: Array) -> Array:
    """θ_0 of the inner loop: φ for maml, zeros for lirpg. [S, A]."""
    return phi if cfg.problem == "maml" else jnp.zeros_like(phi)


def inner_reward(cfg: MetaGradConfig, mdp: tabular.TabularMDP, phi: Array) -> Array:
    """The inner objective's reward table: R for maml, R + φ for lirpg. [S, A]."""
    return mdp.R if cfg.problem == "maml" else mdp.R + phi


def exact_objective(cfg: MetaGradConfig, mdp: tabular.TabularMDP, theta: Array, reward: Array,
                    estimator: str = "exact") -> Array:
    """The exact expectation an ingredient estimates. Returns [].

    infinite oracle: J(θ) closed form. finite oracle: J_T(θ) with the bootstrap the estimator's
    surrogate uses, sg(V_θ) (dice: none; V_{sg θ}(reward) with cfg.critic_gradient), so that
    estimator bias is separated from truncation.
    """
    if cfg.oracle == "infinite":
        return tabular.exact_return(mdp, theta, reward)
    bootstrap = None
    if estimator == "exact" or est.USES_CRITIC[estimator]:
        bootstrap = critic_values(cfg, mdp, theta, reward)
    return tabular.finite_horizon_return(mdp, theta, cfg.horizon, bootstrap, reward)


def critic_values(cfg: MetaGradConfig, mdp: tabular.TabularMDP, theta: Array, reward: Array) -> Array:
    """V_{sg θ}(reward) [S]: without gradient, or with its gradient in `reward` if cfg.critic_gradient."""
    values = tabular.state_values(mdp, lax.stop_gradient(theta), reward)
    return values if cfg.critic_gradient else lax.stop_gradient(values)


def sampled_objective(key: Array, cfg: MetaGradConfig, mdp: tabular.TabularMDP, theta: Array,
                      reward: Array, estimator: str, samples: int, count: Array | None = None) -> Array:
    """Mean surrogate of `estimator` over `samples` on-policy trajectories of π_θ. Returns [].

    Trajectories come from sg(π_θ); the critic (estimators that use one) is the reference noisy
    exact V, with no gradient in θ and, if cfg.critic_gradient, the gradient of V_{sg θ}(reward)
    in `reward`; rewards are gathered from `reward` [S, A] so they carry its gradient.
    `count` (traced int <= samples) averages over the first `count` trajectories only, so that one
    compiled program serves every sample size up to `samples`.
    """
    key_traj, key_critic = jax.random.split(key)
    traj = tabular.sample_trajectories(key_traj, mdp, theta, samples, cfg.horizon)
    log_prob = jax.nn.log_softmax(theta, axis=-1)[traj.states, traj.actions]
    rewards = reward[traj.states, traj.actions]
    if est.USES_CRITIC[estimator]:
        critic = tabular.noisy_critic(key_critic, mdp, theta, cfg.noise, reward)
        if cfg.critic_gradient:  # the value of the noisy critic, the gradient of V_{sg θ}(reward)
            exact = critic_values(cfg, mdp, theta, reward)
            critic = exact + lax.stop_gradient(critic - exact)
    else:
        critic = jnp.zeros(mdp.num_states, rewards.dtype)
    values, bootstrap = critic[traj.states], critic[traj.final_states]
    discounts = jnp.full(rewards.shape, mdp.gamma, rewards.dtype)
    advantages = jax.vmap(est.gae, in_axes=(0, 0, 0, 0, None))(
        rewards, values, discounts, bootstrap, cfg.gae_lambda)
    per_trajectory = jax.vmap(
        lambda lp, r, a, d: est.surrogate(estimator, log_prob=lp, behaviour_log_prob=None,
                                          rewards=r, advantages=a, discounts=d,
                                          lam=cfg.loaded_lambda))
    values = per_trajectory(log_prob, rewards, advantages, discounts)
    if count is None:
        return jnp.mean(values)
    return jnp.sum(jnp.where(jnp.arange(samples) < count, values, 0.0)) / count


def ingredient_objective(key: Array, cfg: MetaGradConfig, ingredient: Source,
                         mdp: tabular.TabularMDP, theta: Array, reward: Array,
                         count: Array | None = None) -> Array:
    """The exact or sampled objective of one ingredient at θ. Returns [].

    `count` (traced int, sampled ingredients only): use the first `count` of the `samples`
    trajectories, or the exact expectation when count == 0 — so one compiled program serves every
    sample size and every exact/sampled code (an unbatched count makes this a real `lax.cond`).
    """
    if ingredient.is_exact:
        return exact_objective(cfg, mdp, theta, reward, ingredient.estimator)
    if count is None:
        return sampled_objective(key, cfg, mdp, theta, reward, ingredient.estimator,
                                 ingredient.samples)
    return lax.cond(
        count > 0,
        lambda: sampled_objective(key, cfg, mdp, theta, reward, ingredient.estimator,
                                  ingredient.samples, jnp.maximum(count, 1)),
        lambda: exact_objective(cfg, mdp, theta, reward, ingredient.estimator))


def problem(cfg: MetaGradConfig, mdp: tabular.TabularMDP) -> core.MetaProblem:
    """MAML or LIRPG on `mdp` as a `core.MetaProblem` (θ, φ: [S, A]).

    init: θ_0 = φ (maml) or 0 (lirpg); a step is α ∇_θ of the source's objective with the inner
    reward (R, or R + φ for lirpg); the outer objective uses R. Sources are `ingredient_objective`.
    """
    def objective(key, source, theta, phi, count):
        return ingredient_objective(key, cfg, source, mdp, theta, inner_reward(cfg, mdp, phi), count)

    def outer(key, source, theta, phi, count=None):
        return ingredient_objective(key, cfg, source, mdp, theta, mdp.R, count)

    return core.MetaProblem(lambda phi: initial_theta(cfg, phi), core.gradient_increment(objective), outer)


def exact_meta_gradient(cfg: MetaGradConfig, mdp: tabular.TabularMDP, phi: Array,
                        estimator: str = "exact", hyper: Hyper | None = None) -> Array:
    """d/dφ J_out(θ_K(φ)) with exact inner steps, by autodiff through K steps. [S, A] -> [S, A].

    `estimator` picks the finite oracle's bootstrap (ignored for the infinite oracle); `hyper`
    (optional, traced) replaces α, K ≤ cfg.steps.
    """
    hyper = config_hyper(cfg) if hyper is None else hyper
    return core.exact_meta_gradient(problem(cfg, mdp), phi, hyper, cfg.steps, estimator)


def estimate_meta_gradient(key: Array, cfg: MetaGradConfig, mdp: tabular.TabularMDP,
                           phi: Array, counts: Array | None = None,
                           hyper: Hyper | None = None) -> Array:
    """One decomposed stochastic meta-gradient estimate (Liu, Feng et al. 2022, §4). [S, A] -> [S, A].

    `core.meta_gradient` with the sources (cfg.inner, cfg.hessian, cfg.outer): every part samples
    from π_{θ̂_k} with its own key (`core.step_keys`). `counts` [3] (traced ints, optional): the
    trajectories actually used by inner, hessian and outer, each at most the source's `samples`
    (its padded capacity); 0 means exact. `hyper` (optional, traced): α, active steps K ≤ cfg.steps
    and the injected error c. When cfg.hessian_error ≠ 0, mean(θ² ⊙ E), E = c + 0.3·N(0, 1) (E = 0
    where c = 0), is added to the Hessian part's objective (the reference study's injected error).
    """
    hyper = config_hyper(cfg) if hyper is None else hyper
    return core.meta_gradient(problem(cfg, mdp), cfg.parts, key, phi, hyper, cfg.steps, counts,
                              with_error=bool(cfg.hessian_error))


def batched_estimates(cfg: MetaGradConfig):
    """A jitted f(keys [M, R], mdps (stacked M), phis [M, S, A], counts=None, hyper=None) -> [M, R, S, A].

    `counts` [3] and `hyper` (optional, shared by all MDPs and repeats): the first counts[i] of each
    ingredient's `samples` trajectories (0: exact) and traced α, K, c, so sweeps over sample sizes,
    codes, learning rates, steps ≤ cfg.steps and injected errors compile once.
    """
    per_mdp = jax.vmap(lambda key, mdp, phi, counts, h: estimate_meta_gradient(key, cfg, mdp, phi, counts, h),
                       in_axes=(0, None, None, None, None))
    batched = jax.jit(jax.vmap(per_mdp, in_axes=(0, 0, 0, None, None)))
    return lambda keys, mdps, phis, counts=None, hyper=None: batched(keys, mdps, phis, counts, hyper)


def batched_exact(cfg: MetaGradConfig, estimator: str = "exact"):
    """A jitted f(mdps (stacked M), phis [M, S, A], hyper=None) -> exact meta-gradients [M, S, A]."""
    batched = jax.jit(jax.vmap(lambda mdp, phi, h: exact_meta_gradient(cfg, mdp, phi, estimator, h),
                               in_axes=(0, 0, None)))
    return lambda mdps, phis, hyper=None: batched(mdps, phis, hyper)
