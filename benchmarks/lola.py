"""Seconds for 500 updates × 10 seeds of LOLA-DiCE variants, beside a naive per-update loop.

Usage: python benchmarks/lola.py [--variants inner128-outer128,inner-exact] [--updates 500]
                                 [--seeds 10] [--naive-updates 3] [--cpu-devices N]
                                 [--out results.json]

gmrl: each variant runs its compiled, seed-vmapped program (`gmrl.algos.lola.train`), the seeds
split over 2 CPU devices as `gmrl lola` does (`--cpu-devices 1` for one); compile time is
reported separately from run time.

Naive baseline (our own code, written for this timing only; NOT the reference implementation,
which needs PyTorch and is not installed here): the reference's per-update structure in plain
Python — a Python loop over the 100 time steps to sample each batch with numpy, and the DiCE
objectives evaluated step by step and differentiated by eager (un-jitted) JAX autodiff, one seed at a
time. Eager JAX has a higher per-operation overhead than PyTorch, so its cost is only indicative;
the issue quotes ≈ 0.4 s per update per seed for the reference, and the ratio to that figure is
reported as well.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from gmrl.algos import lola
from gmrl.devices import use_cpu_devices
from gmrl.envs import ipd
from gmrl.io import atomic_write_json

QUOTED_REFERENCE_SECONDS_PER_UPDATE_PER_SEED = 0.4
NAIVE_VARIANT = "inner128-outer128"
PAYOFF = np.array(ipd.PAYOFF)
SWAP = np.array(ipd.SWAP)


def naive_rollout(rng, theta1, theta2, num_episodes, horizon):
    """Per-step Python loop (numpy): states [N, T] and actions [N, T, 2], rewards [N, T, 2]."""
    p1, p2 = 1 / (1 + np.exp(-np.asarray(theta1))), 1 / (1 + np.exp(-np.asarray(theta2)))
    state = np.zeros(num_episodes, int)
    states, actions, rewards = [], [], []
    for _ in range(horizon):
        a1 = (rng.random(num_episodes) >= p1[state]).astype(int)
        a2 = (rng.random(num_episodes) >= p2[SWAP[state]]).astype(int)
        states.append(state)
        actions.append(np.stack([a1, a2], -1))
        rewards.append(np.stack([PAYOFF[2 * a1 + a2], PAYOFF[2 * a2 + a1]], -1))
        state = 1 + 2 * a1 + a2
    return np.stack(states, 1), np.stack(actions, 1), np.stack(rewards, 1)


def naive_dice(theta1, theta2, values, batch, player, gamma):
    """DiCE + baseline of `player`, built step by step as the reference builds its graph."""
    states, actions, rewards = batch
    dependencies, total = 0.0, 0.0
    for t in range(states.shape[1]):
        s1, s2 = states[:, t], SWAP[states[:, t]]
        logit1, logit2 = theta1[s1], theta2[s2]
        lp = (jnp.where(actions[:, t, 0] == 0, jax.nn.log_sigmoid(logit1),
                        jax.nn.log_sigmoid(-logit1))
              + jnp.where(actions[:, t, 1] == 0, jax.nn.log_sigmoid(logit2),
                          jax.nn.log_sigmoid(-logit2)))
        dependencies = dependencies + lp
        own = s1 if player == 0 else s2
        total = total + gamma ** t * (
            jnp.exp(dependencies - jax.lax.stop_gradient(dependencies)) * rewards[:, t, player]
            + (1 - jnp.exp(lp - jax.lax.stop_gradient(lp))) * values[own])
    return jnp.mean(total)


def naive_update(rng, thetas, values, cfg):
    """One LOLA-DiCE update of both players (lookahead and outer step), eager and unbatched.

    As autograd does: the lookahead is computed once with its backward closure (`jax.vjp`), the
    outer batch is sampled at its value, and the chain rule is applied by hand.
    """
    grads = []
    for player in (0, 1):
        own, opp = thetas[player], thetas[1 - player]

        def ordered(mine, other, player=player):
            return (mine, other) if player == 0 else (other, mine)

        batch = naive_rollout(rng, *ordered(np.asarray(own), np.asarray(opp)), cfg.comp,
                              cfg.horizon)

        def lookahead(mine, opp=opp, batch=batch, ordered=ordered, player=player):
            grad_opp = jax.grad(lambda o: naive_dice(*ordered(mine, o), values[1 - player],
                                                     batch, 1 - player, cfg.gamma))(opp)
            return opp + cfg.inner_lr * grad_opp

        look, look_vjp = jax.vjp(lookahead, own)
        outer = naive_rollout(rng, *ordered(np.asarray(own), np.asarray(look)), cfg.outer,
                              cfg.horizon)
        direct, through_look = jax.grad(
            lambda mine, other, ordered=ordered, player=player, outer=outer: naive_dice(
                *ordered(mine, other), values[player], outer, player, cfg.gamma),
            argnums=(0, 1))(own, look)
        grads.append(direct + look_vjp(through_look)[0])
    return [t + cfg.outer_lr * g for t, g in zip(thetas, grads, strict=True)]


def time_naive(num_updates: int) -> float:
    """Seconds per update per seed of the naive loop (NAIVE_VARIANT, one seed), after a warm-up."""
    cfg = lola.LolaConfig()
    rng = np.random.default_rng(0)
    thetas = [jnp.zeros(5), jnp.zeros(5)]
    values = jnp.zeros((2, 5))
    thetas = naive_update(rng, thetas, values, cfg)
    start = time.perf_counter()
    for _ in range(num_updates):
        thetas = naive_update(rng, thetas, values, cfg)
        jax.block_until_ready(thetas)
    return (time.perf_counter() - start) / num_updates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="inner128-outer128,inner-exact-outer-exact,"
                        "inner1024,off-policy")
    parser.add_argument("--updates", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--naive-updates", type=int, default=3)
    parser.add_argument("--out", default=None, help="Write the numbers as JSON here.")
    parser.add_argument("--cpu-devices", type=int, default=None,
                        help="CPU devices to shard the seeds over (default: as `gmrl lola`).")
    args = parser.parse_args()
    use_cpu_devices(args.cpu_devices)  # before any JAX computation
    print(f"seeds sharded over {len(jax.devices())} device(s)")
    naive = time_naive(args.naive_updates)
    naive_total = naive * args.updates * args.seeds
    quoted_total = QUOTED_REFERENCE_SECONDS_PER_UPDATE_PER_SEED * args.updates * args.seeds
    print(f"naive eager loop (ours): {naive:.2f} s per update per seed -> {naive_total:.0f} s "
          f"for {args.updates} updates x {args.seeds} seeds (quoted reference: {quoted_total:.0f} s)")
    results = {"naive_seconds_per_update_per_seed": naive, "updates": args.updates,
               "seeds": args.seeds, "variants": {}}
    for name in args.variants.split(","):
        cfg = lola.LolaConfig(**lola.REFERENCE_VARIANTS[name])
        result = lola.train(cfg, 0, args.seeds, args.updates)
        total = result.compile_seconds + result.run_seconds
        row = {"compile_s": result.compile_seconds, "run_s": result.run_seconds}
        line = (f"{name:>24}: {result.run_seconds:7.1f} s run + {result.compile_seconds:5.1f} s "
                f"compile = {total:7.1f} s")
        if name == NAIVE_VARIANT:  # the ratios compare like with like (128/128 only)
            row.update(speedup_vs_naive=naive_total / result.run_seconds,
                       speedup_vs_quoted_reference=quoted_total / result.run_seconds)
            line += (f"; x{row['speedup_vs_naive']:.0f} vs naive, "
                     f"x{row['speedup_vs_quoted_reference']:.0f} vs quoted reference")
        results["variants"][name] = row
        print(line, flush=True)
    if args.out:
        atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
