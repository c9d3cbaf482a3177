"""gmrl's side of one tabular row: the same MDPs, θ0 = 0, the same settings as the reference script.

Runs under gmrl's interpreter as its own process (so the harness can time the whole process).

    python gmrl_side.py --mdps MDPS.npz --config '{"problem": "maml", ...}' --repeats 20 \
        --mode timing --out OUT.npz
    python gmrl_side.py ... --mode stats --repeats 2000 --stat-chunk 20 --out OUT.npz

MDPS.npz: P [M, S, A, S], R [M, S, A], gamma. The config names MetaGradConfig fields; the
ingredients are "exact" or "NAME:N". φ = 0 for every MDP: MAML's θ0 = 0 (the uniform policy, as
in the reference), LIRPG's zero intrinsic reward (its θ0 is 0 already).

- timing: one `gmrl.evaluate.evaluate(cfg, mdps, φ, seed, repeats)` call, the public API path
  (exact meta-gradients, the estimates, their statistics), at the reference's grid-point scale.
- stats: the estimates in batches of --batch repeats through one compiled program; writes the
  per-repeat correlation with the exact meta-gradient [M, R], std sums over consecutive chunks of
  --stat-chunk repeats [M, R / chunk], the exact meta-gradient [M, d] and the mean estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import table  # noqa: E402  (this folder's numpy-only statistics)

from gmrl import metagrad as mg  # noqa: E402
from gmrl.envs import tabular  # noqa: E402
from gmrl.evaluate import evaluate  # noqa: E402

INGREDIENTS = ("inner", "hessian", "outer")


def config_from(spec: dict) -> mg.MetaGradConfig:
    fields = {k: v for k, v in spec.items() if k not in INGREDIENTS}
    for name in INGREDIENTS:
        fields[name] = mg.Source.parse(spec.get(name, "exact"))
    return mg.MetaGradConfig(**fields)


def load_mdps(path: str):
    data = np.load(path)
    mdps = [tabular.make_mdp(p, r, float(data["gamma"])) for p, r in zip(data["P"], data["R"], strict=True)]
    return jax.tree.map(lambda *leaves: np.stack(leaves), *mdps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mdps", required=True)
    parser.add_argument("--config", required=True, help="JSON of MetaGradConfig fields")
    parser.add_argument("--repeats", type=int, required=True, help="repeats per MDP")
    parser.add_argument("--mode", choices=("timing", "stats"), required=True)
    parser.add_argument("--batch", type=int, default=200, help="stats: repeats per compiled call")
    parser.add_argument("--stat-chunk", type=int, default=20, help="stats: repeats per std sum")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    cfg = config_from(json.loads(args.config))
    mdps = load_mdps(args.mdps)
    count = mdps.R.shape[0]
    phis = np.zeros(mdps.R.shape, np.float64)
    if args.mode == "timing":
        result = evaluate(cfg, mdps, phis, args.seed, args.repeats)
        estimates = result["estimates"].reshape(count, args.repeats, -1)
        exact = result["exact"].reshape(count, -1)
        np.savez(args.out, corr=table.centred_cosine(estimates, exact), exact=exact,
                 std_sums=table.std_sum(estimates)[:, None])
        return

    started = time.perf_counter()
    with jax.enable_x64(True):
        exact = np.asarray(mg.batched_exact(cfg)(mdps, phis)).reshape(count, -1)
        estimate = mg.batched_estimates(cfg)
        key = jax.random.key(args.seed)
        batches = []
        for done in range(0, args.repeats, args.batch):
            size = min(args.batch, args.repeats - done)
            keys = jax.random.split(jax.random.fold_in(key, done), (count, size))
            batches.append(np.asarray(estimate(keys, mdps, phis)).reshape(count, size, -1))
    estimates = np.concatenate(batches, axis=1)
    if not np.all(np.isfinite(estimates)):
        sys.exit("gmrl's estimates contain NaN or infinity")
    np.savez(args.out, corr=table.centred_cosine(estimates, exact), exact=exact,
             std_sums=table.chunk_std_sums(estimates, args.stat_chunk),
             mean_estimate=estimates.mean(1), seconds=time.perf_counter() - started)


if __name__ == "__main__":
    main()
