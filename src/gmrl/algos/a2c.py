"""Advantage actor-critic (A2C) on gymnax environments, fully compiled and vmapped over seeds.

Shapes: N parallel environments, T steps per rollout; a `Batch` holds obs [T, N, ...],
actions [T, N], rewards [T, N], dones [T, N] and last_obs [N, ...]. The loss is the reference A2C
loss (Mnih et al. 2016) with GAE (Schulman et al. 2016):

    L = −mean_n Σ_t A_t log π(a_t|s_t) / T  +  c_v mean (V(s_t; γ) − (A_t + V_t))²  −  c_ent mean H[π(·|s_t)]

where A = GAE(r, V, γ·(1 − done), V(s_T), λ) from `gmrl.estimators.gae` and the policy term is
`gmrl.estimators.maml` (or `gmrl.estimators.lvc` for the low-bias variant used by MGRL).
The coefficients (γ, λ, c_ent, c_v) are arrays so that MGRL can differentiate through them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import gymnax
import jax
import jax.numpy as jnp
import optax
from jax import lax

from gmrl import estimators, sampling
from gmrl.algos import presets
from gmrl.algos.networks import Network, make_network
from gmrl.errors import require

Array = jax.Array

MINATAR_GAMES = ("Breakout-MinAtar", "Asterix-MinAtar", "Freeway-MinAtar", "SpaceInvaders-MinAtar")
SUPPORTED_ENVS = ("CartPole-v1",) + MINATAR_GAMES
INNER_SURROGATES = ("maml", "lvc")


@dataclasses.dataclass(frozen=True)
class A2CConfig:
    """A2C hyper-parameters (64 envs × 5 steps, γ 0.99, GAE λ 0.95, as the reference's runs).

    `preset` (`gmrl.algos.presets`): "reference" — Adam (ε `adam_eps`), learning rate decayed
    linearly to 0 over `total_updates` updates (0: constant), no γ input to the A2C critic;
    "full" — RMSProp (`rms_decay`, `rms_eps`), constant learning rate.
    """

    env_name: str = "Breakout-MinAtar"
    num_envs: int = 64
    num_steps: int = 5
    learning_rate: float = 7e-4
    gamma: float = 0.99
    lam: float = 0.95
    entropy_coef: float = 0.01
    value_coef: float = 0.5
    max_grad_norm: float = 0.5
    rms_decay: float = 0.99
    rms_eps: float = 1e-5
    preset: str = "reference"
    adam_eps: float = 1e-8
    total_updates: int = 0


class Coefs(NamedTuple):
    """Loss coefficients; scalars (arrays so that they can be differentiated)."""

    gamma: Array
    lam: Array
    entropy: Array
    value: Array


class Batch(NamedTuple):
    obs: Array        # [T, N, ...] observation before each action
    actions: Array    # [T, N] int32
    rewards: Array    # [T, N]
    dones: Array      # [T, N] 1.0 where the episode ended after the step
    last_obs: Array   # [N, ...] observation after the last step (bootstrap state)


class Runner(NamedTuple):
    env_state: Any        # gymnax state, leaves [N, ...]
    obs: Array            # [N, ...]
    episode_return: Array  # [N] return of the running episodes so far


class EpisodeStats(NamedTuple):
    return_sum: Array    # [] sum of the returns of the episodes completed
    return_count: Array  # [] how many episodes completed
    entropy_sum: Array | float = 0.0  # [] Σ_t mean_n H[π(·|s_t)] of the acting policy


class Algorithm(NamedTuple):
    """A training algorithm as pure functions: `init(key) -> state`, `step(state) -> (state, metrics)`.

    `frames_per_step` environment frames are consumed by each step (over all N envs), plus
    `init_frames` once in `init`. `metrics` is a dict of scalars (see `METRIC_NAMES`).
    """

    init: Callable[[Array], Any]
    step: Callable[[Any], tuple[Any, dict[str, Array]]]
    frames_per_step: int
    init_frames: int


METRIC_NAMES = ("return_sum", "return_count", "gamma", "lam", "entropy_coef", "value_coef",
                "loss", "meta_grad_norm", "entropy")
"""`entropy` is the policy entropy of the acting policy, mean over a step's rollout(s)."""


def make_env(env_name: str):
    """The gymnax environment and its default parameters; only discrete-action envs.

    Names starting with "ALE/" come from `gmrl.envs.ale.make_env` (Atari through ale-py, imported
    only then; observations [84, 84, 4], pixel values 0..255)."""
    if env_name.startswith("ALE/"):
        try:
            from gmrl.envs import ale
        except ImportError as err:
            require(False, f"environment {env_name!r} needs the Atari adapter gmrl.envs.ale and "
                           f"ale-py (pip install ale-py); import failed: {err}")
        return ale.make_env(env_name)
    require(env_name in gymnax.registered_envs,
            f"unknown environment {env_name!r}; supported: {', '.join(SUPPORTED_ENVS)}, "
            "ALE/<game> (Atari, e.g. ALE/Breakout-v5), or another discrete-action gymnax environment")
    env, env_params = gymnax.make(env_name)
    require(hasattr(env.action_space(env_params), "n"),
            f"environment {env_name!r} has continuous actions; only discrete actions are supported")
    return env, env_params


def make_env_and_network(env_name: str, critic: str = "column") -> tuple[Any, Any, Network]:
    """Environment, parameters and network; `critic`: how the critic sees γ (`make_network`)."""
    env, env_params = make_env(env_name)
    obs_shape = tuple(env.observation_space(env_params).shape)
    return env, env_params, make_network(obs_shape, env.action_space(env_params).n, critic)


def make_optimizer(config: A2CConfig) -> optax.GradientTransformation:
    """Global-norm clipping then the preset's optimiser (`gmrl.algos.presets.make_optimizer`)."""
    return presets.make_optimizer(config)


def fixed_coefs(config: A2CConfig) -> Coefs:
    return Coefs(*(jnp.float32(v) for v in (config.gamma, config.lam, config.entropy_coef,
                                            config.value_coef)))


def sample_actions(key: Array, logits: Array) -> Array:
    """Inverse-CDF categorical sample: logits [N, A] -> actions [N] int32."""
    return sampling.categorical(key, jax.nn.softmax(logits, axis=-1))


def reset_runner(env, env_params, key: Array, num_envs: int) -> Runner:
    obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(key, num_envs),
                                                          env_params)
    return Runner(env_state, obs, jnp.zeros((num_envs,), jnp.float32))


def rollout(env, env_params, network: Network, params, runner: Runner, key: Array,
            num_steps: int) -> tuple[Runner, Batch, EpisodeStats]:
    """T = num_steps steps of all N envs with actions from π_params (no gradient flows)."""
    params = lax.stop_gradient(params)

    def one_step(carry: tuple[Runner, EpisodeStats], step_key: Array):
        runner, stats = carry
        act_key, env_key = jax.random.split(step_key)
        logits = network.policy(params, runner.obs)
        actions = sample_actions(act_key, logits)
        env_keys = jax.random.split(env_key, runner.obs.shape[0])
        obs, env_state, reward, terminated, truncated, info = jax.vmap(
            env.step, in_axes=(0, 0, 0, None))(env_keys, runner.env_state, actions, env_params)
        reward = reward.astype(jnp.float32)
        done = jnp.logical_or(terminated, truncated)
        episode_return = runner.episode_return + reward
        if "game_over" in info:  # Atari (gmrl.envs.ale): the whole game's unclipped score
            ended, ended_return = info["game_over"], info["episode_score"].astype(jnp.float32)
        else:
            ended, ended_return = done, episode_return
        completed = jnp.sum(jnp.where(ended, ended_return, 0.0), dtype=jnp.float32)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        entropy = -jnp.mean(jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1), dtype=jnp.float32)
        stats = EpisodeStats(stats.return_sum + completed,
                             stats.return_count + jnp.sum(ended, dtype=jnp.int32),
                             stats.entropy_sum + entropy)
        next_runner = Runner(env_state, obs, jnp.where(done, 0.0, episode_return))
        return (next_runner, stats), (runner.obs, actions, reward, done.astype(jnp.float32))

    zero = EpisodeStats(jnp.float32(0.0), jnp.int32(0), jnp.float32(0.0))
    (runner, stats), (obs, actions, rewards, dones) = lax.scan(
        one_step, (runner, zero), jax.random.split(key, num_steps))
    return runner, Batch(obs, actions, rewards, dones, runner.obs), stats


def _gae_batch(rewards: Array, values: Array, discounts: Array, bootstrap: Array,
               lam: Array) -> Array:
    """`estimators.gae` over the env axis: [T, N] x3, [N], [] -> [T, N]."""
    return jax.vmap(estimators.gae, in_axes=(1, 1, 1, 0, None), out_axes=1)(
        rewards, values, discounts, bootstrap, lam)


def policy_surrogate(name: str, log_prob: Array, advantages: Array) -> Array:
    """Mean over envs of the per-trajectory surrogate, per step: [T, N] x2 -> []."""
    ones = jnp.ones_like(log_prob[:, 0])
    if name == "maml":
        per_env = jax.vmap(lambda lp, adv: estimators.maml(lp, adv, ones), in_axes=1)
    elif name == "lvc":
        per_env = jax.vmap(lambda lp, adv: estimators.lvc(lp, None, adv, ones), in_axes=1)
    else:
        raise ValueError(f"unknown inner surrogate {name!r}; allowed: {', '.join(INNER_SURROGATES)}")
    return jnp.mean(per_env(log_prob, advantages)) / log_prob.shape[0]


def _loss_from_outputs(logits_all: Array, values_all: Array, baseline_all: Array, batch: Batch,
                       coefs: Coefs, surrogate: str) -> tuple[Array, dict]:
    """The A2C loss from network outputs on obs_all = [obs; last_obs]: logits [T+1, N, A],
    values [T+1, N] (predictions) and baseline [T+1, N] (the values inside A_t and the targets)."""
    discounts = coefs.gamma * (1.0 - batch.dones)
    advantages = _gae_batch(batch.rewards, baseline_all[:-1], discounts, baseline_all[-1],
                            coefs.lam)
    targets = advantages + baseline_all[:-1]
    log_probs = jax.nn.log_softmax(logits_all[:-1], axis=-1)
    log_prob = jnp.take_along_axis(log_probs, batch.actions[..., None], axis=-1)[..., 0]
    pg_loss = -policy_surrogate(surrogate, log_prob, advantages)
    value_loss = jnp.mean((values_all[:-1] - targets) ** 2)
    entropy = -jnp.mean(jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1))
    loss = pg_loss + coefs.value * value_loss - coefs.entropy * entropy
    return loss, {"pg_loss": pg_loss, "value_loss": value_loss, "entropy": entropy}


def _obs_all(batch: Batch) -> Array:
    return jnp.concatenate([batch.obs, batch.last_obs[None]], axis=0)  # [T+1, N, ...]


def actor_critic_loss(network: Network, params, batch: Batch, coefs: Coefs,
                      surrogate: str = "maml", baseline_params=None) -> tuple[Array, dict]:
    """The A2C loss above at `params`, advantages and value targets held constant (stop-gradient
    through the baseline values). Returns (loss [], aux dict of its three terms).

    `baseline_params` (default: stop_gradient(params)) supplies the baseline values instead; with
    it the loss is an ordinary function of `params` whose derivative is the one taken here.
    """
    obs_all = _obs_all(batch)
    logits_all, values_all = network.apply(params, obs_all, coefs.gamma)
    if baseline_params is None:
        baseline_all = lax.stop_gradient(values_all)
    else:
        baseline_all = network.apply(lax.stop_gradient(baseline_params), obs_all, coefs.gamma)[1]
    return _loss_from_outputs(logits_all, values_all, baseline_all, batch, coefs, surrogate)


def loss_gradient(network: Network, params, batch: Batch, coefs: Coefs, surrogate: str = "maml",
                  exact_jacobian: bool = False, critic_gamma: Array | None = None,
                  baseline: Array | None = None) -> tuple[Array, Any]:
    """(loss, ∇_θ L) of the A2C loss, with advantages and targets constant inside ∇_θ.

    One forward pass: the gradient is the pullback of ∂L/∂(logits, values). With
    exact_jacobian the baseline inside A_t is the differentiable network output itself, so an outer
    derivative of ∇_θ L (w.r.t. θ or the coefficients) sees how the advantages move with θ — the
    exact Jacobian of the update as computed. Without it the baseline is stop_gradient (plain A2C).
    `critic_gamma` (default coefs.gamma) is the γ fed to the critic; `baseline` ([T+1, N]) replaces
    the baseline values by given ones.
    """
    gamma_in = coefs.gamma if critic_gamma is None else critic_gamma
    (logits_all, values_all), pullback = jax.vjp(
        lambda p: network.apply(p, _obs_all(batch), gamma_in), params)
    baseline_all = values_all if exact_jacobian else lax.stop_gradient(values_all)
    if baseline is not None:
        baseline_all = baseline

    def head_loss(logits, values):
        return _loss_from_outputs(logits, values, baseline_all, batch, coefs, surrogate)

    (loss, _), output_grads = jax.value_and_grad(head_loss, argnums=(0, 1), has_aux=True)(
        logits_all, values_all)
    return loss, pullback(output_grads)[0]


def inner_update(network: Network, optimizer: optax.GradientTransformation, params, opt_state,
                 batch: Batch, coefs: Coefs, surrogate: str = "maml", exact_jacobian: bool = False):
    """One optimiser step on the A2C loss: θ' = θ + optimiser(∇_θ L). Returns (θ', state', loss).

    See `loss_gradient` for exact_jacobian (MGRL differentiates θ' w.r.t. θ and the coefficients).
    """
    loss, grads = loss_gradient(network, params, batch, coefs, surrogate, exact_jacobian)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


class A2CState(NamedTuple):
    params: Any
    opt_state: Any
    runner: Runner
    key: Array


def make_a2c(config: A2CConfig) -> Algorithm:
    """Plain A2C with fixed (γ, λ, c_ent, c_v) from `config`."""
    env, env_params, network = make_env_and_network(config.env_name,
                                                    presets.critic_input(config.preset, meta=False))
    optimizer = make_optimizer(config)
    coefs = fixed_coefs(config)

    def init(key: Array) -> A2CState:
        net_key, env_key, key = jax.random.split(key, 3)
        params = network.init(net_key)
        return A2CState(params, optimizer.init(params),
                        reset_runner(env, env_params, env_key, config.num_envs), key)

    def step(state: A2CState):
        key, roll_key = jax.random.split(state.key)
        runner, batch, stats = rollout(env, env_params, network, state.params, state.runner,
                                       roll_key, config.num_steps)
        params, opt_state, loss = inner_update(network, optimizer, state.params, state.opt_state,
                                               batch, coefs)
        metrics = {"return_sum": stats.return_sum, "return_count": stats.return_count,
                   "gamma": coefs.gamma, "lam": coefs.lam, "entropy_coef": coefs.entropy,
                   "value_coef": coefs.value, "loss": loss, "meta_grad_norm": jnp.float32(0.0),
                   "entropy": stats.entropy_sum / config.num_steps}
        return A2CState(params, opt_state, runner, key), metrics

    return Algorithm(init, step, config.num_envs * config.num_steps, 0)


def run_steps(algorithm: Algorithm, states, num_steps: int):
    """`num_steps` steps of every seed: states with leaves [S, ...] -> (states, metrics [S, num_steps]).

    One `lax.scan` per seed, vmapped over seeds; jit it (or call `compiled_run_steps`).
    """
    def per_seed(state):
        return lax.scan(lambda s, _: algorithm.step(s), state, None, length=num_steps)

    return jax.vmap(per_seed)(states)


@functools.lru_cache(maxsize=32)
def compiled_run_steps(algorithm: Algorithm, num_steps: int):
    """jit(run_steps) for a fixed chunk length (cached per algorithm and length); the states buffer
    is donated."""
    return jax.jit(lambda states: run_steps(algorithm, states, num_steps), donate_argnums=0)


def init_seeds(algorithm: Algorithm, key: Array, num_seeds: int):
    """Initial states for `num_seeds` seeds (leaves [S, ...]), from independent keys."""
    return jax.jit(jax.vmap(algorithm.init))(jax.random.split(key, num_seeds))


def train(algorithm: Algorithm, key: Array, num_seeds: int, num_steps: int):
    """The whole training loop under one jit, vmapped over seeds. Returns (states, metrics)."""
    @jax.jit
    def run(key):
        states = jax.vmap(algorithm.init)(jax.random.split(key, num_seeds))
        return run_steps(algorithm, states, num_steps)

    return run(key)
