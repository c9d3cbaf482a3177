"""Broken user functions for `gmrl check`'s error handling."""

import numpy as np


def raises(task, rng):
    return 1 / 0


def wrong_shape(task, rng):
    task.sample(task.phi, 4, rng)
    return np.zeros(task.R.size)


def returns_nan(task, rng):
    task.sample(task.phi, 4, rng)
    return np.full(task.R.shape, np.nan)


def zero_episodes(task, rng):
    task.sample(task.phi, 0, rng)
    return np.zeros(task.R.shape)


def bad_theta(task, rng):
    task.sample(np.zeros(3), 4, rng)
    return np.zeros(task.R.shape)


def bad_rng(task, rng):
    task.sample(task.phi, 4, 42)
    return np.zeros(task.R.shape)


def never_samples(task, rng):
    return np.zeros(task.R.shape)


def not_traceable(task, key):
    episodes = task.sample(task.phi, 4, key)
    if episodes.rewards.sum() > 0:  # a Python branch on a traced value: fine eagerly, not under jit
        return np.zeros(task.R.shape)
    return np.ones(task.R.shape)
