"""MAML-RL meta-gradients written in plain JAX, as a user would, against gmrl's `task` protocol.

Four versions: DiCE through the inner step (second order), the same with the inner gradient
stopped (first order), a reward-to-go log-probability surrogate, and DiCE divided by 2.
"""

import jax
import jax.numpy as jnp

import gmrl

EPISODES = 64


def log_probs(theta, episodes):
    return jax.nn.log_softmax(theta, axis=-1)[episodes.states[:, :-1], episodes.actions]


def dice_objective(theta, episodes, gamma):
    """Mean over episodes of Σ_t γ^t exp(Σ_{i≤t} log π − sg(·)) r_t (Foerster et al. 2018)."""
    cumulative = jnp.cumsum(log_probs(theta, episodes), axis=1)
    magic_box = jnp.exp(cumulative - jax.lax.stop_gradient(cumulative))
    discounts = gamma ** jnp.arange(episodes.rewards.shape[1])
    return jnp.mean(jnp.sum(discounts * magic_box * episodes.rewards, axis=1))


def reward_to_go_objective(theta, episodes, gamma):
    """Mean over episodes of Σ_t γ^t G_t log π(a_t|s_t), G_t = Σ_{u≥t} γ^{u−t} r_u."""
    horizon = episodes.rewards.shape[1]
    discounts = gamma ** jnp.arange(horizon)
    discounted = discounts * episodes.rewards
    returns = jnp.flip(jnp.cumsum(jnp.flip(discounted, 1), 1), 1) / discounts
    return jnp.mean(jnp.sum(discounts * returns * log_probs(theta, episodes), axis=1))


def _maml(task, key, objective, second_order=True):
    keys = jax.random.split(key, task.steps + 1)

    def outer(theta0):
        theta = theta0
        for k in range(task.steps):
            batch = task.sample(theta, EPISODES, keys[k])
            step = jax.grad(objective)(theta, batch, task.gamma)
            theta = theta + task.lr * (step if second_order else jax.lax.stop_gradient(step))
        return objective(theta, task.sample(theta, EPISODES, keys[-1]), task.gamma)

    return jax.grad(outer)(task.phi)


@gmrl.check.jax_function
def maml_dice(task, key):
    return _maml(task, key, dice_objective)


@gmrl.check.jax_function
def maml_dice_first_order(task, key):
    return _maml(task, key, dice_objective, second_order=False)


@gmrl.check.jax_function
def maml_logprob(task, key):
    return _maml(task, key, reward_to_go_objective)


@gmrl.check.jax_function
def maml_dice_halved(task, key):
    return _maml(task, key, dice_objective) / 2
