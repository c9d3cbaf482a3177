"""LIRPG meta-gradients in JAX: the intrinsic reward φ is added to the rewards of the inner step."""

import jax
import jax.numpy as jnp

import gmrl

from .jax_maml import EPISODES, dice_objective


def _lirpg(task, key, second_order=True):
    k_in, k_out = jax.random.split(key)
    theta0 = jnp.zeros_like(task.phi)
    inner_batch = task.sample(theta0, EPISODES, k_in)

    def outer(phi):
        def inner(theta):
            intrinsic = phi[inner_batch.states[:, :-1], inner_batch.actions]
            return dice_objective(theta, inner_batch._replace(rewards=inner_batch.rewards + intrinsic),
                                  task.gamma)
        step = jax.grad(inner)(theta0)
        theta1 = theta0 + task.lr * (step if second_order else jax.lax.stop_gradient(step))
        return dice_objective(theta1, task.sample(theta1, EPISODES, k_out), task.gamma)

    return jax.grad(outer)(task.phi)


@gmrl.check.jax_function
def lirpg_dice(task, key):
    return _lirpg(task, key)


@gmrl.check.jax_function
def lirpg_first_order(task, key):
    return _lirpg(task, key, second_order=False)
