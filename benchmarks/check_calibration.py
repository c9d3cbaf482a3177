"""How often `gmrl check`'s sequential rule names the wrong label: every shipped JAX client, 200 seeds.

A full `gmrl check` costs about a minute on a 2-core CPU, mostly the candidates' expectations, so
200 seeds × 6 clients of it are out of reach. This benchmark SIMULATES the decision rule with the
real ingredients instead, on the default tasks (seed 0's 10 MDPs, S = 20, A = 5, T = 20, γ = 0.8,
K = 1, α = 10, θ0 = 0, 64 episodes per sample call):

1. the candidates' expectations μ_v from `--truth-draws` Monte-Carlo draws per MDP
   (`gmrl.check.candidates.expectations`), taken as exact, with their per-draw variances σ_v²;
2. a pool of `--pool` real estimates per MDP of each client (tests/check_clients/jax_maml.py,
   jax_lirpg.py; jit(vmap(vmap)) over draws and MDPs), re-centred on its true explanation's
   μ (DiCE / 2: μ_DiCE / 2): the client's real per-draw noise around a known truth. How far the raw
   pool mean is from that μ is printed (z of D̂ = ‖ḡ − μ‖²/d), a check of the assumption;
3. per seed: the harness's candidates μ_v + N(0, σ_v²/N) with N = 1000 draws (the default) and
   its variances σ_v²/N; the user's repeats resampled with replacement from the centred pool,
   R = 50 per MDP at look 1, doubled at each look, `diagnosis.diagnose(..., look=j)` at every
   look, stopping at the first decisive label or after `--looks` looks (5 looks = 800 repeats per
   MDP, about what the 2-minute budget affords the PyTorch clients).

Prints the confusion matrix (truth × label, `undetermined` and `unexplained` columns), the
wrong-label rate with its 95% Clopper–Pearson upper bound, and the mean number of repeats used.

    python benchmarks/check_calibration.py [--seeds 200] [--looks 5] [--out calibration.json]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from scipy import stats as scipy_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gmrl import metagrad as mg  # noqa: E402
from gmrl.check import candidates as cand  # noqa: E402
from gmrl.check import diagnosis, run  # noqa: E402
from gmrl.check.task import JaxTask, Recorder  # noqa: E402
from tests.check_clients import jax_lirpg, jax_maml  # noqa: E402

CLIENTS = {  # name: (module, problem, true label, true candidate, scale)
    "maml_dice": (jax_maml, "maml", "second-order-unbiased", "second-order-unbiased[dice, reward-to-go]",
                  1.0),
    "maml_dice_first_order": (jax_maml, "maml", "first-order", "first-order[dice, reward-to-go]", 1.0),
    "maml_logprob": (jax_maml, "maml", "vanilla-logprob-hessian",
                     "vanilla-logprob-hessian[maml, reward-to-go]", 1.0),
    "maml_dice_halved": (jax_maml, "maml", "scaled", "second-order-unbiased[dice, reward-to-go]", 0.5),
    "lirpg_dice": (jax_lirpg, "lirpg", "second-order-unbiased", "second-order-unbiased[dice, reward-to-go]",
                   1.0),
    "lirpg_first_order": (jax_lirpg, "lirpg", "first-order", "first-order[dice, reward-to-go]", 1.0),
}
COLUMNS = ["second-order-unbiased", "first-order", "vanilla-logprob-hessian", "lvc-hessian", "scaled",
           "undetermined", "unexplained"]


def pool_estimates(fn, mdps, phis, problem: str, size: int, seed: int, chunk: int = 250) -> np.ndarray:
    """`size` estimates per MDP of a JAX client, jit(vmap(vmap)). [M, size, S·A]."""
    recorder = Recorder()

    def one(key, item):
        mdp, phi = item
        task = JaxTask(mdp.P, mdp.R, mdp.gamma, mdp.init_state, 20, 1, 10.0, problem, phi, recorder)
        return fn(task, key)

    f = jax.jit(jax.vmap(jax.vmap(one, in_axes=(0, None)), in_axes=(0, 0)))
    out = []
    for start in range(0, size, chunk):
        keys = jax.random.split(jax.random.key(seed + start), (phis.shape[0], min(chunk, size - start)))
        out.append(np.asarray(f(keys, (mdps, phis))))
    return np.concatenate(out, 1).reshape(phis.shape[0], size, -1)


def simulate(rng, centred, means, draw_var, names, labels, first: int, looks: int, draws: int,
             alpha: float) -> tuple[str, int]:
    """One seed of the sequential rule (module docstring, step 3). Returns (label, repeats used)."""
    count, size, _ = centred.shape
    seen = means + rng.standard_normal(means.shape) * np.sqrt(draw_var / draws)
    picks = np.empty((count, 0), int)
    for look in range(1, looks + 1):
        more = first if look == 1 else picks.shape[1]
        picks = np.concatenate([picks, rng.integers(size, size=(count, more))], 1)
        estimates = np.take_along_axis(centred, picks[..., None], 1)
        result = diagnosis.diagnose(estimates, seen, draw_var / draws, names, labels, alpha, look=look)
        if result.label != "undetermined":
            break
    return result.label, picks.shape[1]


def upper_bound(wrong: int, total: int) -> float:
    """One-sided 95% Clopper–Pearson upper bound on a rate."""
    return 1.0 if wrong == total else float(scipy_stats.beta.ppf(0.95, wrong + 1, total - wrong))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--looks", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=50, help="repeats per MDP at look 1")
    parser.add_argument("--mdps", type=int, default=10)
    parser.add_argument("--pool", type=int, default=2000, help="real estimates per MDP per client")
    parser.add_argument("--truth-draws", type=int, default=4000)
    parser.add_argument("--draws", type=int, default=1000, help="the harness's candidate draws")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    results, setups = {}, {}
    with jax.enable_x64(True):
        for name in args.clients.split(","):
            module, problem, truth_label, truth_name, scale = CLIENTS[name]
            if problem not in setups:
                cfg = mg.MetaGradConfig(problem=problem, steps=1, lr=10.0, horizon=20, oracle="finite")
                mdps, phis = run._problem(0, cfg, args.mdps, 20, 5, 0.8, None, "zeros")
                variants = cand.variants(problem)
                means, mean_vars = cand.expectations(mdps, phis, problem, 10.0, 20,
                                                     cand.Structure((64,), (None,)), variants,
                                                     args.truth_draws, 7919)
                setups[problem] = (mdps, phis, variants, means, mean_vars * args.truth_draws)
                print(f"{problem}: candidates from {args.truth_draws} draws per MDP "
                      f"[{time.perf_counter() - started:.0f} s]", flush=True)
            mdps, phis, variants, means, draw_var = setups[problem]
            names, labels = [v.name for v in variants], [v.label for v in variants]
            truth = scale * means[:, names.index(truth_name)]
            pool = pool_estimates(getattr(module, name), mdps, phis, problem, args.pool, 11)
            raw_d, raw_se = diagnosis.discrepancy(pool, truth, scale**2 * draw_var[:, names.index(truth_name)]
                                                  / args.truth_draws)
            centred = pool - pool.mean(1, keepdims=True) + truth[:, None]
            counts = dict.fromkeys(COLUMNS, 0)
            used = []
            for seed in range(args.seeds):
                label, repeats = simulate(np.random.default_rng([seed, 22]), centred, means, draw_var,
                                          names, labels, args.repeats, args.looks, args.draws, args.alpha)
                counts[label] = counts.get(label, 0) + 1
                used.append(repeats)
            wrong = sum(c for k, c in counts.items() if k not in (truth_label, "undetermined"))
            results[name] = {"truth": truth_label, "counts": counts, "wrong": wrong,
                             "wrong_rate": wrong / args.seeds,
                             "wrong_rate_upper95": upper_bound(wrong, args.seeds),
                             "mean_repeats": float(np.mean(used)),
                             "pool_z": raw_d / raw_se if raw_se else 0.0}
            print(f"{name}: done [{time.perf_counter() - started:.0f} s]", flush=True)
    width = max(len(n) for n in results) + 2
    print(f"\n{args.seeds} seeds per client; looks at {args.repeats}·2^(j-1) repeats per MDP "
          f"(at most {args.looks}), level α/(j(j+1)), α = {args.alpha}; {args.mdps} MDPs; candidates "
          f"from {args.draws} draws per seed; pools of {args.pool} real estimates per MDP\n")
    short = ["second-order", "first-order", "logprob-hess", "lvc-hessian", "scaled", "undetermined",
             "unexplained"]
    print(f"{'client (truth)':<{width}}" + "".join(f"{c:>14}" for c in short)
          + f"{'wrong':>8}{'≤ (95%)':>9}{'repeats':>9}{'pool z':>8}")
    for name, r in results.items():
        print(f"{name:<{width}}" + "".join(f"{r['counts'].get(c, 0):>14}" for c in COLUMNS)
              + f"{r['wrong_rate']:>8.3f}{r['wrong_rate_upper95']:>9.3f}{r['mean_repeats']:>9.0f}"
              + f"{r['pool_z']:>8.1f}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "results": results}, indent=1))


if __name__ == "__main__":
    main()
