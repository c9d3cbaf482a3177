"""Run one of the reference's tabular scripts unmodified and record what it computes.

Runs under an interpreter that has PyTorch (the reference's own requirement), never imports gmrl.
The reference code is imported from the checkout given with --reference; nothing of it is copied
or changed. Two of its functions are wrapped at run time, only to record their inputs:

- `TabularMDP.__init__` (its random-MDP constructor): each MDP's transition rows P [S·A, S] and
  reward vector R [S·A], in the order the script builds them;
- the script's `corr(estimate, oracle)`: every per-repeat meta-gradient estimate and the oracle
  meta-gradient it is scored against (the script itself keeps only per-MDP averages).

Then the script's own `main()` runs with the arguments after `--`, and the recorded arrays, the
script's own per-MDP `corr.npy` / `var.npy` and the in-process seconds are written to --record
(.npz). Usage:

    python ref_driver.py --reference REF --script tabular/maml/decompose.py --record out.npz \
        --logdir TMPDIR -- --inner_est dice --hessian_est dice --outer_est dice ...
"""

from __future__ import annotations

import argparse
import glob
import importlib
import os
import sys
import time

import numpy as np


def main() -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="checkout of the reference repository")
    parser.add_argument("--script", required=True, help="script path inside the checkout")
    parser.add_argument("--record", required=True, help="output .npz")
    parser.add_argument("--logdir", required=True, help="the script's --logdir (a scratch folder)")
    parser.add_argument("--float64", action="store_true",
                        help="re-run in float64: the scripts cast P and R with Tensor.float(); this "
                             "makes that cast (and new tensors' default dtype) float64 at run time")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    script_args = argv[split + 1:]

    script = os.path.join(os.path.abspath(args.reference), args.script)
    folder, name = os.path.split(script)
    sys.path.insert(0, folder)
    module = importlib.import_module(os.path.splitext(name)[0])
    if args.float64:
        module.torch.set_default_dtype(module.torch.float64)
        module.torch.Tensor.float = module.torch.Tensor.double
    mdp_module = importlib.import_module("tabular_mdp")
    imported = time.perf_counter()

    mdps_p, mdps_r, estimates, oracles = [], [], [], []
    original_init = mdp_module.TabularMDP.__init__

    def recording_init(self, *a, **k):
        original_init(self, *a, **k)
        mdps_p.append(np.array(self.P, dtype=np.float64))
        mdps_r.append(np.array(self.R_matrix, dtype=np.float64))

    mdp_module.TabularMDP.__init__ = recording_init
    original_corr = module.corr

    def recording_corr(x, y):
        estimates.append(np.array(x, dtype=np.float64).reshape(-1))
        oracles.append(np.array(y, dtype=np.float64).reshape(-1))
        return original_corr(x, y)

    module.corr = recording_corr
    sys.argv = [script, "--logdir", args.logdir, *script_args]
    module.main()
    finished = time.perf_counter()

    runs = sorted(glob.glob(os.path.join(args.logdir, "test_*")))
    if len(runs) != 1:
        sys.exit(f"expected one result folder under {args.logdir}, found {len(runs)}")
    ref_corr = np.load(os.path.join(runs[0], "corr.npy"))
    ref_var = np.load(os.path.join(runs[0], "var.npy"))
    mdps = len(mdps_p)
    repeats = len(estimates) // max(mdps, 1)
    if mdps == 0 or repeats * mdps != len(estimates):
        sys.exit(f"recorded {len(estimates)} estimates for {mdps} MDPs: not a whole number per MDP")
    np.savez(args.record,
             P=np.stack(mdps_p), R=np.stack(mdps_r),
             estimates=np.stack(estimates).reshape(mdps, repeats, -1),
             oracles=np.stack(oracles).reshape(mdps, repeats, -1)[:, 0],
             ref_corr=ref_corr, ref_var=ref_var,
             import_seconds=imported - started, main_seconds=finished - imported,
             torch_version=str(module.torch.__version__), numpy_version=np.__version__)


if __name__ == "__main__":
    main()
