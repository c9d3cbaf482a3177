"""gmrl's exact LOLA from θ = 0: the logits after each of U updates, in gmrl's convention.

    python gmrl_lola.py --updates 20 --out OUT.npz

gmrl records its metrics before each update, so U + 1 updates are run and the logits before
updates 1..U (= after updates 0..U-1) are kept: thetas [U, 2, 5], θ = logit(P(cooperate)),
states (start, CC, CD, DC, DD) from each player's own side.
"""

from __future__ import annotations

import argparse

import numpy as np

from gmrl.algos import lola


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    cfg = lola.LolaConfig(comp=None, hessian=None, outer=None)
    result = lola.train(cfg, seed=0, num_seeds=1, num_updates=args.updates + 1, chunk=args.updates + 1)
    coop = np.asarray(result.metrics.cooperation, np.float64)[0]  # [U + 1, 2, 5]
    np.savez(args.out, thetas=np.log(coop / (1 - coop))[1:])


if __name__ == "__main__":
    main()
