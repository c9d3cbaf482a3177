"""Exact vs estimated meta-gradients on a set of tabular MDPs: the tabular experiment in one call."""

from __future__ import annotations

import time

import jax
import numpy as np

from gmrl import estimators as est
from gmrl import metagrad as mg
from gmrl import stats
from gmrl.envs import tabular
from gmrl.errors import require


def problem_set(seed: int, cfg: mg.MetaGradConfig, num_mdps: int = 10, num_states: int = 20,
                num_actions: int = 5, gamma: float = 0.8, mdp: tabular.TabularMDP | None = None,
                theta0="zeros"):
    """Random reference MDPs (or the user's `mdp`, M = 1) and their φ, in float64.

    `theta0`: MAML's θ_0 = φ — "zeros" (the reference study's uniform policy), "normal" (N(0, 1)
    per MDP from `seed`) or an [S, A] table (see `metagrad.initial_meta_params`).
    Returns (mdps stacked [M], phis [M, S, A]); deterministic in `seed`.
    """
    with jax.enable_x64(True):
        key_mdp, key_phi = jax.random.split(jax.random.key(seed))
        if mdp is None:
            mdps = tabular.random_mdps(key_mdp, num_mdps, num_states=num_states,
                                       num_actions=num_actions, gamma=gamma)
        else:
            mdps = jax.tree.map(lambda x: jax.numpy.asarray(x)[None], mdp)  # float64 here
        count = mdps.R.shape[0]
        phis = jax.vmap(lambda k, m: mg.initial_meta_params(k, m, cfg.problem, theta0))(
            jax.random.split(key_phi, count), mdps)
    return mdps, phis


def require_memory(needed: int, what: str) -> None:
    """InputError before computing when `needed` bytes exceed 80% of this machine's memory."""
    import os

    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    require(needed <= 0.8 * total,
            f"{what} need about {needed / 2**30:,.1f} GiB, more than this machine's "
            f"{total / 2**30:.0f} GiB allows; use fewer samples, repeats, MDPs or a shorter horizon")


def oracle_estimator(cfg: mg.MetaGradConfig) -> str:
    """Which surrogate's expectation the finite oracle takes: the one the ingredients share."""
    if cfg.oracle == "infinite":
        return "exact"
    named = {i.estimator for i in (cfg.inner, cfg.hessian, cfg.outer) if i.estimator != "exact"}
    uses_critic = {est.USES_CRITIC[n] for n in named}
    require(len(uses_critic) <= 1,
            "the finite oracle needs ingredients that agree on the bootstrap: dice uses none, "
            f"loaded/lvc/maml use the critic; got {', '.join(sorted(named))}")
    return next(iter(named)) if named else "exact"


def problem_module(cfg):
    """The module of cfg's problem: `gmrl.metagrad` (maml, lirpg) or `gmrl.mgrl_tabular` (mgrl)."""
    if cfg.problem == "mgrl":
        from gmrl import mgrl_tabular

        return mgrl_tabular
    return mg


def evaluate(cfg: mg.MetaGradConfig, mdps: tabular.TabularMDP, phis, seed: int,
             repeats: int) -> dict:
    """R repeated decomposed estimates per MDP, the exact meta-gradient, and their statistics.

    Returns a dict with `exact` [M, S, A], `estimates` [M, R, S, A], `summary` (stats.summarize),
    and `seconds` {first_call} (includes compilation).
    """
    require(isinstance(repeats, int) and repeats >= 3,
            f"the number of repeats must be an integer >= 3 (bias2 needs 3), got {repeats}")
    count = mdps.R.shape[0]
    module = problem_module(cfg)
    require_memory(module.estimate_bytes(cfg, count * repeats),
                   f"{count} MDP(s) × {repeats} repeats of K={cfg.steps} steps, T={cfg.horizon}, "
                   f"{cfg.inner}/{cfg.hessian}/{cfg.outer}")
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(seed), (count, repeats))
        exact = np.asarray(module.batched_exact(cfg, oracle_estimator(cfg))(mdps, phis))
        estimate = module.batched_estimates(cfg)
        start = time.perf_counter()
        estimates = np.asarray(estimate(keys, mdps, phis).block_until_ready())
        first = time.perf_counter() - start
    require(bool(np.all(np.isfinite(estimates))),
            "the estimates contain NaN or infinity (a learning rate this large can overflow the "
            "importance weights); try a smaller --lr or fewer --steps")
    summary = stats.summarize(estimates.reshape(count, repeats, -1), exact.reshape(count, -1))
    flat = [m for m, c in enumerate(summary["per_mdp"]["corr"]) if not np.isfinite(c)]
    require(not flat, f"the correlation is undefined for MDP(s) {flat}: every estimate there is constant "
            "across coordinates (the policy saturates, typical of a very large α·K); try a smaller "
            "--lr or fewer --steps")
    return {"exact": exact, "estimates": estimates, "summary": summary,
            "seconds": {"first_call": first}}
