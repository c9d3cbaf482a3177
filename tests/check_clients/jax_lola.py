"""LOLA-DiCE on the iterated prisoner's dilemma in plain JAX, against gmrl's `game` protocol.

Written independently of `gmrl.algos.lola`: one batch of joint episodes for both players'
look-ahead steps, a differentiable step of the opponent's DiCE gradient, then each player's DiCE
objective on a fresh batch at the look-ahead point.
"""

import jax
import jax.numpy as jnp

import gmrl

EPISODES = 128


def dice(theta1, theta2, episodes, player, gamma):
    def own_log_prob(theta, p):
        logits = theta[episodes.states[..., p]]
        return jnp.where(episodes.actions[..., p] == 0, jax.nn.log_sigmoid(logits),
                         jax.nn.log_sigmoid(-logits))

    total = jnp.cumsum(own_log_prob(theta1, 0) + own_log_prob(theta2, 1), axis=1)
    weights = jnp.exp(total - jax.lax.stop_gradient(total))
    discounts = gamma ** jnp.arange(episodes.rewards.shape[1])
    return jnp.mean(jnp.sum(weights * discounts * episodes.rewards[..., player], axis=1))


def _lola(game, key, second_order=True):
    k_in, k_out1, k_out2 = jax.random.split(key, 3)
    inner = game.sample(game.theta1, game.theta2, EPISODES, k_in)  # shared by both look-aheads

    def step(g):
        return g if second_order else jax.lax.stop_gradient(g)

    def objective1(theta1):
        g2 = jax.grad(dice, argnums=1)(theta1, game.theta2, inner, 1, game.gamma)
        theta2 = game.theta2 + game.lr * step(g2)
        return dice(theta1, theta2, game.sample(game.theta1, theta2, EPISODES, k_out1), 0, game.gamma)

    def objective2(theta2):
        g1 = jax.grad(dice, argnums=0)(game.theta1, theta2, inner, 0, game.gamma)
        theta1 = game.theta1 + game.lr * step(g1)
        return dice(theta1, theta2, game.sample(theta1, game.theta2, EPISODES, k_out2), 1, game.gamma)

    return jnp.stack([jax.grad(objective1)(game.theta1), jax.grad(objective2)(game.theta2)])


@gmrl.check.jax_function
def lola_dice(game, key):
    return _lola(game, key)


@gmrl.check.jax_function
def lola_first_order(game, key):
    return _lola(game, key, second_order=False)
