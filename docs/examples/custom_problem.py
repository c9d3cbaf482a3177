"""A GMRL problem gmrl does not ship, in one page: a meta-learned per-state step size.

φ [S] are log step sizes; the learner starts at θ_0 = 0 and takes K policy-gradient steps
θ_{k+1} = θ_k + α exp(φ_s) ∇_θ J(θ_k)[s, :]; the meta-objective is J(θ_K). Defined against the
public API (`gmrl.core`), it gets the exact meta-gradient, the decomposed estimates with every
estimator and source code, and `gmrl tabular`'s statistics. Run: python docs/examples/custom_problem.py
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from gmrl import core, stats
from gmrl import estimators as est
from gmrl import metagrad as mg
from gmrl.envs import tabular

K, LR, MDPS, REPEATS, N = 2, 5.0, 4, int(sys.argv[1]) if len(sys.argv) > 1 else 100, 16


def step_size_problem(mdp, cfg):
    """The custom problem as a core.MetaProblem: (init, increment, outer)."""
    def objective(key, source, theta, count):  # J, or a source's surrogate of it, at θ
        return mg.ingredient_objective(key, cfg, source, mdp, theta, mdp.R, count)

    def increment(key, source, theta, phi, lr, count=None, extra=None):
        grad = jax.grad(lambda th: objective(key, source, th, count) + (extra(th) if extra else 0.0))(theta)
        return lr * jnp.exp(phi)[:, None] * grad

    def outer(key, source, theta, phi, count=None):
        return objective(key, source, theta, count)

    return core.MetaProblem(lambda phi: jnp.zeros_like(mdp.R), increment, outer)


with jax.enable_x64(True):
    mdps = tabular.random_mdps(jax.random.key(0), MDPS, num_states=10, num_actions=3)
    phis = jnp.zeros((MDPS, 10))
    hyper, keys = core.Hyper(LR, K), jax.random.split(jax.random.key(1), (MDPS, REPEATS))
    print(f"{'estimator':10} {'code':5} {'corr':>7} {'bias2':>10} {'bias2 95% CI':>23} {'variance':>10}")
    for name in est.ESTIMATORS:
        if name == "exact":
            continue
        cfg = mg.MetaGradConfig(horizon=10, oracle="finite", noise=0.0)  # J_T with `name`'s bootstrap
        parts = core.Decomposition(*[core.Source(name, N)] * 3)
        exact = jax.vmap(lambda m, p, n=name, c=cfg: core.exact_meta_gradient(
            step_size_problem(m, c), p, hyper, K, n))(mdps, phis)
        draws = jax.jit(jax.vmap(jax.vmap(lambda k, m, p, counts, c=cfg, d=parts: core.meta_gradient(
            step_size_problem(m, c), d, k, p, hyper, K, counts), (0, None, None, None)), (0, 0, 0, None)))
        for code in ("lee", "ele", "eel", "lll"):
            counts = jnp.array([N if c == "l" else 0 for c in code])
            s = stats.summarize(np.asarray(draws(keys, mdps, phis, counts)), np.asarray(exact))
            print(f"{name:10} {code:5} {s['corr']:7.3f} {s['bias2']:10.3g} "
                  f"[{s['bias2_ci_low']:10.3g}, {s['bias2_ci_high']:10.3g}] {s['variance']:10.3g}")
