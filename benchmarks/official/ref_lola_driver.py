"""Run the reference's LOLA-DiCE script unmodified for a few seeds and record θ after every update.

Runs under an interpreter that has PyTorch; never imports gmrl. The script (lola/
lola_dice_original.py of the checkout given with --reference) parses its arguments when imported,
so the arguments after `--` are handed to it that way. One of its functions is wrapped at run
time, only to record its inputs: the per-update progress evaluation `step(theta1, theta2, ...)`,
which the script calls once after each update with both agents' current logits. Then, for each
seed, the script's own seeding, agents and `play` loop run as its main block runs them (seed
0, 1, ...; the script itself always does 10 seeds).

    python ref_lola_driver.py --reference REF --record out.npz --seeds 1 --logdir TMP \
        -- --n_update 20 --inner_exact --outer_exact

Writes thetas [seeds, updates, 2, 5] (the reference's convention: σ(θ) is P(defect), states
(start, DD, DC, CD, CC)) and the seconds of each seed's `play`. --float64 re-runs it in float64
(to measure how much of a difference to gmrl is the reference's float32).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="checkout of the reference repository")
    parser.add_argument("--record", required=True, help="output .npz")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--logdir", required=True, help="the script's --logdir (a scratch folder)")
    parser.add_argument("--float64", action="store_true",
                        help="run in float64: new tensors' default dtype and the script's "
                             "Tensor.float() casts become float64 at run time")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])

    folder = os.path.join(os.path.abspath(args.reference), "lola")
    sys.path.insert(0, folder)
    sys.argv = [os.path.join(folder, "lola_dice_original.py"), "--logdir", args.logdir,
                *argv[split + 1:]]
    if args.float64:
        import torch

        torch.set_default_dtype(torch.float64)
        torch.Tensor.float = torch.Tensor.double
    module = importlib.import_module("lola_dice_original")

    thetas: list[np.ndarray] = []
    original_step = module.step

    def recording_step(theta1, theta2, *rest):
        thetas.append(np.stack([theta1.detach().double().numpy(), theta2.detach().double().numpy()]))
        return original_step(theta1, theta2, *rest)

    module.step = recording_step
    seconds = []
    for seed in range(args.seeds):
        module.set_seed(seed)
        started = time.perf_counter()
        module.play(module.Agent(), module.Agent(), module.hp.inner_step)
        seconds.append(time.perf_counter() - started)
    np.savez(args.record, thetas=np.stack(thetas).reshape(args.seeds, module.hp.n_update, 2, -1),
             play_seconds=np.array(seconds), n_update=module.hp.n_update)


if __name__ == "__main__":
    main()
