"""Seconds per estimate of `gmrl check`'s two paths on the same MAML-RL meta-gradient.

Python loop: the PyTorch client (tests/check_clients/torch_maml.py, DiCE, create_graph=True),
called once per estimate with NumPy episodes. JAX: the same estimator in JAX
(tests/check_clients/jax_maml.py), vmapped over repeats and MDPs and jitted. K = 1, α = 10,
64 episodes per sample call, S = 20, A = 5, T = 20, 10 MDPs × 50 repeats (the defaults).

    python benchmarks/check.py [--repeats 50] [--mdps 10]
"""

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gmrl import metagrad as mg  # noqa: E402
from gmrl.check import run  # noqa: E402
from gmrl.check.task import Task  # noqa: E402
from tests.check_clients import jax_maml, torch_maml  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--mdps", type=int, default=10)
    args = parser.parse_args()
    cfg = mg.MetaGradConfig(steps=1, lr=10.0, horizon=20, oracle="finite")
    mdps, phis = run._problem(0, cfg, args.mdps, 20, 5, 0.8, None, "zeros")
    count = args.mdps * args.repeats
    tasks = [Task(np.asarray(mdps.P[m]), np.asarray(mdps.R[m]), float(mdps.gamma[m]),
                  int(mdps.init_state[m]), 20, 1, 10.0, "maml", np.asarray(phis[m]))
             for m in range(args.mdps)]
    started = time.perf_counter()
    run._python_estimates(torch_maml.maml_dice, tasks, args.repeats, 0, progress=False)
    python = (time.perf_counter() - started) / count
    with jax.enable_x64(True):
        _, _, _, first, steady = run._jax_estimates(jax_maml.maml_dice, mdps, phis, 20, 1, 10.0,
                                                    "maml", args.repeats, 0)
    print(f"{args.mdps} MDPs x {args.repeats} repeats = {count} estimates (K=1, α=10, 64 episodes "
          "per sample call, S=20, A=5, T=20)")
    print(f"python loop (PyTorch client): {python * 1e3:.2f} ms per estimate")
    print(f"JAX (vmapped + jitted):       {steady / count * 1e3:.3f} ms per estimate "
          f"(first call incl. compilation {first:.1f} s)")
    print(f"ratio: {python / (steady / count):.0f}x")


if __name__ == "__main__":
    main()
