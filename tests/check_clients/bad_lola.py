"""Broken LOLA gradient functions for `gmrl check --game ipd`'s error handling."""

import numpy as np


def raises(game, rng):
    return {}["theta"]


def wrong_shape(game, rng):
    game.sample(game.theta1, game.theta2, 4, rng)
    return np.zeros(5)


def returns_nan(game, rng):
    game.sample(game.theta1, game.theta2, 4, rng)
    return np.full((2, 5), np.nan)


def zero_episodes(game, rng):
    game.sample(game.theta1, game.theta2, 0, rng)
    return np.zeros((2, 5))


def bad_theta(game, rng):
    game.sample(np.zeros((2, 5)), game.theta2, 4, rng)
    return np.zeros((2, 5))


def bad_rng(game, rng):
    game.sample(game.theta1, game.theta2, 4, 7)
    return np.zeros((2, 5))
