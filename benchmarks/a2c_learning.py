"""Does A2C learn on a MinAtar game? Return curve plus the diagnostics of issue 10, item 2.

Usage: python benchmarks/a2c_learning.py [--env Breakout-MinAtar] [--frames 2000000] [--seeds 2]
           [--log-points 20] [--learning-rate 7e-4] [--num-envs 64] [--eps-in-sqrt] [--out DIR]

Trains `gmrl.algos.a2c` (vmapped over seeds, one `lax.scan` per chunk) and logs, per seed and chunk:
mean episode return, policy entropy, value loss, policy loss, the gradient's global norm before
clipping (and how often it is clipped), the update's global norm and the mean probability of the
first action (NOOP on MinAtar). `--eps-in-sqrt` swaps in the earlier optimiser, RMSProp with ε inside
the square root (g/√(ν + ε)), to reproduce the plateau. For Breakout-MinAtar the trained policy is
then played for 2000 steps × 64 envs per seed, and the paddle's column histogram is reported (the
plateau policy keeps the paddle in columns 4–5; a tracking policy covers the whole row).

Writes DIR/progress.csv, DIR/summary.json (final return: mean over the last 10 % of frames per seed,
then mean ± 95 % t-interval over seeds; gymnax version; sticky actions) and DIR/return.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from gmrl.algos import a2c, presets
from gmrl.algos.mgrl import make_config

DIAGNOSTICS = ("entropy", "value_loss", "pg_loss", "grad_norm", "clipped", "update_norm", "p_first")
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def make_step(config, eps_in_sqrt: bool):
    """(init, step, network): A2C as in `a2c.make_a2c`, with the diagnostics above as metrics."""
    env, env_params, network = a2c.make_env_and_network(
        config.env_name, presets.critic_input(config.preset, meta=False))
    if eps_in_sqrt:
        optimizer = optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                                optax.rmsprop(config.learning_rate, decay=config.rms_decay,
                                              eps=config.rms_eps, eps_in_sqrt=True))
    else:
        optimizer = a2c.make_optimizer(config)
    coefs = a2c.fixed_coefs(config)

    def init(key):
        net_key, env_key, key = jax.random.split(key, 3)
        params = network.init(net_key)
        return (params, optimizer.init(params),
                a2c.reset_runner(env, env_params, env_key, config.num_envs), key)

    def step(state):
        params, opt_state, runner, key = state
        key, roll_key = jax.random.split(key)
        runner, batch, stats = a2c.rollout(env, env_params, network, params, runner, roll_key,
                                           config.num_steps)
        (_, aux), grads = jax.value_and_grad(
            lambda p: a2c.actor_critic_loss(network, p, batch, coefs), has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        grad_norm = optax.global_norm(grads)
        probs = jax.nn.softmax(network.policy(params, batch.obs), axis=-1)
        metrics = {"return_sum": stats.return_sum, "return_count": stats.return_count,
                   "entropy": aux["entropy"], "value_loss": aux["value_loss"],
                   "pg_loss": aux["pg_loss"], "grad_norm": grad_norm,
                   "clipped": (grad_norm > config.max_grad_norm).astype(jnp.float32),
                   "update_norm": optax.global_norm(updates), "p_first": jnp.mean(probs[..., 0])}
        return (optax.apply_updates(params, updates), opt_state, runner, key), metrics

    return init, step, network


def paddle_histogram(network, params, seed: int) -> dict:
    """Breakout-MinAtar: the trained policy (sampled) for 2000 steps × 64 envs; the paddle's column
    histogram (fractions) and the mean |ball column − paddle column| when the ball is lost."""
    env, env_params = a2c.make_env("Breakout-MinAtar")
    num_envs, steps = 64, 2000

    @jax.jit
    def play(key):
        reset_key, key = jax.random.split(key)
        obs, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(reset_key, num_envs),
                                                          env_params)

        def one(carry, step_key):
            obs, state = carry
            act_key, env_key = jax.random.split(step_key)
            actions = a2c.sample_actions(act_key, network.policy(params, obs))
            obs, next_state, _, terminated, _, _ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
                jax.random.split(env_key, num_envs), state, actions, env_params)
            return (obs, next_state), (state.pos, jnp.abs(state.ball_x - state.pos), terminated)

        _, (pos, gap, lost) = lax.scan(one, (obs, state), jax.random.split(key, steps))
        return pos, gap, lost

    pos, gap, lost = (np.asarray(v) for v in play(jax.random.key(10_000 + seed)))
    hist = np.bincount(pos.ravel(), minlength=10) / pos.size
    return {"paddle_column_fraction": [round(float(v), 4) for v in hist],
            "gap_when_lost": float(gap[lost].mean()) if lost.any() else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="Breakout-MinAtar")
    parser.add_argument("--frames", type=float, default=2e6, help="frames per seed")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-points", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--num-envs", type=int, default=None)
    parser.add_argument("--preset", choices=presets.PRESETS, default="full",
                        help="full: RMSProp (the optimiser the plateau was found with); reference: "
                             "Adam with linear decay over the run (gmrl.algos.presets)")
    parser.add_argument("--eps-in-sqrt", action="store_true",
                        help="the earlier optimiser: RMSProp with ε inside the square root")
    parser.add_argument("--out", default="a2c_learning")
    args = parser.parse_args()

    overrides = {k: v for k, v in (("learning_rate", args.learning_rate),
                                   ("num_envs", args.num_envs)) if v is not None}
    overrides["preset"] = args.preset
    if args.preset == "reference":  # the learning rate decays linearly over the whole run
        envs = args.num_envs or make_config("a2c", args.env).num_envs
        overrides["total_updates"] = math.ceil(args.frames / (envs * 5))
    config = make_config("a2c", args.env, **overrides)
    init, step, network = make_step(config, args.eps_in_sqrt)
    frames_per_step = config.num_envs * config.num_steps
    total_steps = math.ceil(args.frames / frames_per_step)
    chunk = max(1, total_steps // args.log_points)

    @jax.jit
    def run_chunk(states):
        return jax.vmap(lambda s: lax.scan(lambda c, _: step(c), s, None, length=chunk))(states)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    states = jax.jit(jax.vmap(init))(jax.random.split(jax.random.key(args.seed), args.seeds))
    rows, start = [], time.perf_counter()
    for point in range(1, args.log_points + 1):
        states, metrics = run_chunk(states)
        metrics = jax.device_get(metrics)
        frames = point * chunk * frames_per_step
        for s in range(args.seeds):
            count = int(metrics["return_count"][s].sum())
            row = {"frames": frames, "seed": args.seed + s,
                   "episode_return": float(metrics["return_sum"][s].sum()) / max(count, 1),
                   "episodes": count, "wall_s": round(time.perf_counter() - start, 1)}
            row.update({k: float(np.mean(metrics[k][s])) for k in DIAGNOSTICS})
            rows.append(row)
        latest = [r for r in rows if r["frames"] == frames]
        print(f"{frames / 1e6:6.2f}M frames  return " + " ".join(f"{r['episode_return']:.2f}" for r in latest)
              + "  " + "  ".join(f"{k} {np.mean([r[k] for r in latest]):.4g}" for k in DIAGNOSTICS)
              + f"  {latest[0]['wall_s']:.0f}s", flush=True)
        with open(out / "progress.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    last = max(1, args.log_points // 10)  # the last 10 % of the log points
    final_frames = sorted({r["frames"] for r in rows})[-last:]
    per_seed = [float(np.mean([r["episode_return"] for r in rows
                               if r["seed"] == args.seed + s and r["frames"] in final_frames]))
                for s in range(args.seeds)]
    mean = float(np.mean(per_seed))
    half = (T_975.get(args.seeds - 1, 1.96) * float(np.std(per_seed, ddof=1)) / math.sqrt(args.seeds)
            if args.seeds > 1 else float("nan"))
    summary = {"env": args.env, "frames_per_seed": total_steps // chunk * chunk * frames_per_step,
               "seeds": args.seeds, "final_return_per_seed": per_seed, "final_return_mean": mean,
               "final_return_ci95_halfwidth": half,
               "final_window_frames": [min(final_frames) - chunk * frames_per_step, max(final_frames)],
               "optimizer": "rmsprop eps-in-sqrt (old)" if args.eps_in_sqrt else "a2c.make_optimizer",
               "config": {k: getattr(config, k) for k in ("num_envs", "num_steps", "learning_rate",
                                                          "gamma", "lam", "entropy_coef", "value_coef",
                                                          "max_grad_norm", "rms_decay", "rms_eps")},
               "gymnax_version": metadata.version("gymnax"), "jax_version": jax.__version__,
               "sticky_actions": "none (gymnax MinAtar has no sticky actions; MinAtar's own default is 0.1)",
               "max_steps_in_episode": int(a2c.make_env(args.env)[1].max_steps_in_episode),
               "wall_s": round(time.perf_counter() - start, 1)}
    if args.env == "Breakout-MinAtar":
        params = states[0]
        summary["behaviour"] = [paddle_histogram(network, jax.tree.map(lambda v, i=s: v[i], params),
                                                 args.seed + s) for s in range(args.seeds)]
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    frames = sorted({r["frames"] for r in rows})
    curves = np.array([[r["episode_return"] for r in rows if r["seed"] == args.seed + s]
                       for s in range(args.seeds)])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for curve in curves:
        ax.plot(np.array(frames) / 1e6, curve, color="tab:blue", alpha=0.3, lw=1)
    ax.plot(np.array(frames) / 1e6, curves.mean(0), color="tab:blue", lw=2, label="mean over seeds")
    ax.axhline(28, color="gray", ls="--", lw=1, label="gymnax PPO, 10M steps (≈28)")
    ax.set_xlabel("frames (millions)")
    ax.set_ylabel("episode return")
    ax.set_title(f"A2C on {args.env}, {args.seeds} seeds (gymnax {summary['gymnax_version']}, "
                 "no sticky actions)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "return.png", dpi=120)


if __name__ == "__main__":
    main()
