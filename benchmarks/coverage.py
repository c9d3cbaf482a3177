"""Coverage of the nominal 95% bias2 interval (`gmrl.stats.bias2` / `summarize`), pooled and per MDP.

Settings:
- `maml-lee`: gmrl's own heavy-tailed estimates, the compositional bias of `maml` at K = 2, α = 3,
  8 inner episodes, exact Hessian and outer, finite oracle, exact critic, 10 reference MDPs
  (`gmrl tabular --problem maml --steps 2 --lr 3 --inner maml:8 --hessian exact --outer exact
  --oracle finite --noise 0`). One jitted batch of REPS × R estimates per MDP (common random
  numbers) is cut into REPS replications of R repeats; the reference bias2 of each MDP is the
  all-pairs U-statistic over all REPS × R repeats (its se is printed beside the intervals' width).
- `gaussian`: x = μ + N(0, I) in d = 100, 10 "MDPs", the truth ‖μ‖²/d known exactly.
- `gaussian-rank2`: the same with the noise on 2 directions only (the low-rank covariance behind
  the old interval's failure).
For each: the coverage of the new interval (batch means, t with B − 1 df) and of the delete-one
jackknife normal interval it replaces, and their median width ratio.
Run: python benchmarks/coverage.py [--reps 200] [--repeats 100]   (about 4 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from gmrl import metagrad as mg
from gmrl import stats
from gmrl.evaluate import oracle_estimator, problem_set

MDPS = 10


def jackknife_normal(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The interval gmrl used before: all-pairs U ± Z95 · delete-one jackknife se. x [M, R, d]
    (centred at the truth). Returns (value, low, high) per MDP and the se."""
    num, dim = x.shape[-2], x.shape[-1]
    s1, q = x.sum(-2), (x**2).sum(-1)
    value = ((s1**2).sum(-1) - q.sum(-1)) / (num * (num - 1) * dim)
    loo = (((s1[:, None] - x) ** 2).sum(-1) - (q.sum(-1, keepdims=True) - q)) / (
        (num - 1) * (num - 2) * dim)
    se = np.sqrt((num - 1) / num * ((loo - loo.mean(-1, keepdims=True)) ** 2).sum(-1))
    return value, se


def coverage(x: np.ndarray, theta: np.ndarray, reps: int, repeats: int) -> dict[str, float]:
    """x [M, reps·R, d] centred at g*, theta [M] the reference bias2."""
    covered, pooled, old, old_pooled, width, half = [], [], [], [], [], []
    zero = np.zeros(x.shape[::2])
    for k in range(reps):
        part = x[:, k * repeats:(k + 1) * repeats]
        s = stats.summarize(part, zero)
        per = s["per_mdp"]
        covered.append((per["bias2_ci_low"] <= theta) & (theta <= per["bias2_ci_high"]))
        pooled.append(s["bias2_ci_low"] <= theta.mean() <= s["bias2_ci_high"])
        value, se = jackknife_normal(part)
        old.append(np.abs(value - theta) <= stats.Z95 * se)
        old_pooled.append(abs(value.mean() - theta.mean()) <= stats.Z95 * np.sqrt((se**2).sum()) / len(se))
        width.append((per["bias2_ci_high"] - per["bias2_ci_low"]) / (2 * stats.Z95 * se))
        half.append((per["bias2_ci_high"] - per["bias2_ci_low"]) / 2)
    covered = np.array(covered)
    return {"pooled": float(np.mean(pooled)), "per_mdp": float(covered.mean()),
            "worst_mdp": float(covered.mean(0).min()), "old_pooled": float(np.mean(old_pooled)),
            "old_per_mdp": float(np.mean(old)), "width": float(np.median(width)),
            "half_width": np.median(np.array(half), 0)}


def maml_lee(reps: int, repeats: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Estimates minus g* [M, reps·R, d] of the heavy-tailed setting, the reference bias2 [M] and its
    se [M] (all-pairs U-statistic over every repeat, delete-one jackknife)."""
    cfg = mg.MetaGradConfig(problem="maml", steps=2, lr=3.0, noise=0.0, inner=mg.Ingredient("maml", 8),
                            hessian=mg.Ingredient("exact"), outer=mg.Ingredient("exact"), oracle="finite")
    mdps, phis = problem_set(0, cfg, MDPS)
    total = reps * repeats
    with jax.enable_x64(True):
        exact = np.asarray(mg.batched_exact(cfg, oracle_estimator(cfg))(mdps, phis)).reshape(MDPS, -1)
        estimate = mg.batched_estimates(cfg)
        keys = jax.random.split(jax.random.key(1), (MDPS, total))
        parts = [np.asarray(estimate(keys[:, s:s + block], mdps, phis)).reshape(MDPS, -1, exact.shape[-1])
                 for s in range(0, total, block)]
    x = np.concatenate(parts, 1) - exact[:, None]
    reference = stats.bias2(x, np.zeros_like(exact), batches=total)
    return x, reference.value, reference.se


def gaussian(reps: int, repeats: int, rank: int | None, dim: int = 100, seed: int = 0):
    """Gaussian estimates, the bias in the noise's span and ‖μ‖² three times the noise-only sd of
    ‖x̄‖² (sqrt(2·rank)/R); rank None: isotropic."""
    rng = np.random.default_rng(seed)
    basis = np.eye(dim) if rank is None else np.linalg.qr(rng.normal(size=(dim, rank)))[0].T
    noise = rng.normal(size=(MDPS, reps * repeats, basis.shape[0])) @ basis
    mu = rng.normal(size=(MDPS, basis.shape[0])) @ basis
    size = np.sqrt(basis.shape[0] / repeats) * 3 ** 0.5 * (2 / basis.shape[0]) ** 0.25
    mu *= size / np.linalg.norm(mu, axis=-1, keepdims=True)
    return mu[:, None] + noise, (mu**2).mean(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200, help="replications")
    parser.add_argument("--repeats", type=int, default=100, help="repeats per replication (R)")
    parser.add_argument("--block", type=int, default=2000, help="repeats per jitted call (maml-lee)")
    args = parser.parse_args()
    print(f"coverage of the nominal 95% bias2 interval: {args.reps} replications × {args.repeats} repeats "
          f"× {MDPS} MDPs; new: {stats.BATCHES} batch means, t with {stats.BATCHES - 1} df; old: "
          "delete-one jackknife, normal")
    header = (f"{'setting':<16} {'pooled':>7} {'per-MDP':>8} {'worst MDP':>10} {'old pooled':>11} "
              f"{'old per-MDP':>12} {'width new/old':>14}  reference")
    print(header + "\n" + "-" * len(header))
    for name in ("maml-lee", "gaussian", "gaussian-rank2"):
        started = time.perf_counter()
        if name == "maml-lee":
            x, theta, theta_se = maml_lee(args.reps, args.repeats, args.block)
        else:
            x, theta = gaussian(args.reps, args.repeats, None if name == "gaussian" else 2)
        c = coverage(x, theta, args.reps, args.repeats)
        ref = "exact" if name != "maml-lee" else (
            f"all-pairs over {args.reps * args.repeats} repeats, its se ≤ "
            f"{np.max(theta_se / c['half_width']):.1%} of the median CI half-width")
        print(f"{name:<16} {c['pooled']:>7.1%} {c['per_mdp']:>8.1%} {c['worst_mdp']:>10.1%} "
              f"{c['old_pooled']:>11.1%} {c['old_per_mdp']:>12.1%} {c['width']:>14.2f}  {ref} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
