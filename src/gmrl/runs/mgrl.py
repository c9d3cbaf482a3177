"""Meta-Gradient RL training runs and the a2c / mgrl / mgrl-lvc study, on the run layer.

A run is the point {"study": "mgrl", "algo", "env", "frames", "seeds", "seed", "log_points",
"overrides"} (overrides: `gmrl.algos.mgrl.MGRLConfig` fields). `train` is the training driver:
chunks of steps, each one compiled call (`lax.scan` over steps, `jax.vmap` over seeds); after
each chunk the CSV log (progress.csv), the checkpoint (checkpoint.msgpack, flax.serialization)
and, on request, TensorBoard events (tensorboardX) are brought up to date in the run's folder.
A run whose folder holds a checkpoint of the same configuration continues from it, and ends with
the same numbers as an uninterrupted run. `run_point` wraps `train` for `gmrl.runs.run_points`:
the finished run's summary and its logged rows go into the folder's result store.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gmrl import io
from gmrl.errors import require
from gmrl.store import config_key

CSV_FIELDS = ("frames", "seed", "episode_return", "episodes", "fps", "wall_s", "gamma", "lam",
              "entropy_coef", "value_coef", "loss", "meta_grad_norm", "entropy")
TENSORBOARD_FIELDS = ("episode_return", "entropy", "gamma", "lam", "entropy_coef", "value_coef",
                      "fps")
ALGOS = ("a2c", "mgrl", "mgrl-lvc")  # gmrl.algos.mgrl.ALGOS (tested equal), without importing it
CHECKPOINT = "checkpoint.msgpack"
PROGRESS = "progress.csv"
STATE = "run.json"
SNAPSHOTS = "snapshots"
SNAPSHOT_FRACTIONS = (0.25, 0.5, 0.75)
"""A run also keeps the checkpoints at these fractions of its log points, as
SNAPSHOTS/FRAMES.msgpack (the states `gmrl mgrl-bias --snapshot FRAMES` and the study diagnose:
under the reference preset the inner learning rate has decayed to 0 at the run's end)."""


def run_config(algo: str, env: str, frames: int, seeds: int, seed: int = 0, log_points: int = 100,
               overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The point of one training run, its settings checked (InputError) before anything runs."""
    require(algo in ALGOS, f"unknown algorithm {algo!r}; allowed: {', '.join(ALGOS)}")
    require(frames > 0, f"--frames must be positive, got {frames}")
    require(seeds >= 1, f"--seeds must be at least 1, got {seeds}")
    require(log_points >= 1, f"--log-points must be at least 1, got {log_points}")
    from gmrl.algos import mgrl

    mgrl.make_config(algo, env, **dict(overrides or {}))  # the settings themselves (InputError)
    return {"study": "mgrl", "algo": algo, "env": env, "frames": int(frames), "seeds": int(seeds),
            "seed": int(seed), "log_points": int(log_points),
            "overrides": io.to_jsonable(dict(overrides or {}))}


def _overrides(config: Mapping[str, Any]) -> dict[str, Any]:
    """JSON overrides back to MGRLConfig field values (lists -> tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config["overrides"].items()}


def algorithm_of(config: Mapping[str, Any]):
    """(gmrl.algos.a2c.Algorithm, MGRLConfig) of a run point.

    The run's total number of updates, frames // (num_envs · num_steps) as in the reference
    (its `num_updates`), goes into `total_updates`: the reference preset decays the inner
    learning rate linearly to 0 over it."""
    from gmrl.algos import mgrl

    overrides = _overrides(config)
    settings = mgrl.make_config(config["algo"], config["env"], **overrides)
    overrides.setdefault("total_updates",
                         int(config["frames"]) // (settings.num_envs * settings.num_steps))
    return (mgrl.make_algorithm(config["algo"], config["env"], **overrides),
            mgrl.make_config(config["algo"], config["env"], **overrides))


def has_run(run_dir: Path, config: Mapping[str, Any]) -> bool:
    """Whether `run_dir` holds a checkpoint of the run `config` (something to resume)."""
    state = run_dir / STATE
    if not (run_dir / CHECKPOINT).is_file() or not state.is_file():
        return False
    import json

    try:
        return json.loads(state.read_text(encoding="utf-8")).get("key") == config_key(config)
    except (OSError, ValueError, AttributeError):
        return False


def snapshot_chunks(num_chunks: int) -> set[int]:
    """The log points (1-based chunk counts) whose checkpoints are kept (`SNAPSHOT_FRACTIONS`)."""
    return {min(num_chunks, max(1, round(f * num_chunks))) for f in SNAPSHOT_FRACTIONS}


def snapshot_frames(run_dir: Path) -> list[int]:
    """Frames per seed of the snapshots kept in `run_dir`, ascending."""
    folder = Path(run_dir) / SNAPSHOTS
    found = [p.stem for p in folder.glob("*.msgpack")] if folder.is_dir() else []
    return sorted(int(f) for f in found if f.isdigit())


def _rows(metrics: dict[str, np.ndarray], frames: int, fps: float, wall_s: float,
          first_seed: int) -> list[dict]:
    """One CSV row per seed from a chunk's metrics (arrays [S, steps])."""
    rows = []
    for s in range(metrics["return_sum"].shape[0]):
        episodes = int(metrics["return_count"][s].sum())
        ret = float(metrics["return_sum"][s].sum()) / episodes if episodes else float("nan")
        row = {"frames": frames, "seed": first_seed + s, "episode_return": ret,
               "episodes": episodes, "fps": fps, "wall_s": wall_s}
        for name in ("gamma", "lam", "entropy_coef", "value_coef"):  # values at the chunk's end
            row[name] = float(metrics[name][s, -1])
        for name in ("loss", "meta_grad_norm", "entropy"):  # means over the chunk
            row[name] = float(np.mean(metrics[name][s]))
        rows.append(row)
    return rows


def _typed(row: Mapping[str, Any]) -> dict[str, Any]:
    """A CSV row read back as strings -> numbers."""
    return {k: (int(float(v)) if k in ("frames", "seed", "episodes") else float(v))
            for k, v in row.items()}


def train(config: Mapping[str, Any], run_dir: Path, *, progress: bool = True,
          tensorboard: bool = False) -> dict[str, Any]:
    """Train the run `config` in `run_dir` (created), resuming from its checkpoint if there is
    one for this configuration. Returns {"summary": ..., "rows": every logged row}.

    `seeds` seeds of `algo` on `env` for at least `frames` frames per seed, logged
    `log_points` times (each log point also checkpoints).
    """
    import jax
    from tqdm.auto import tqdm

    from gmrl.algos import a2c
    from gmrl.runs import checkpoint
    from gmrl.runs.sinks import CsvLog, TensorBoardLog

    run_dir = Path(run_dir)
    algorithm, mgrl_config = algorithm_of(config)
    frames_per_step, init_frames = algorithm.frames_per_step, algorithm.init_frames
    total_steps = max(1, math.ceil((config["frames"] - init_frames) / frames_per_step))
    chunk = max(1, math.ceil(total_steps / config["log_points"]))
    num_chunks = math.ceil(total_steps / chunk)
    seeds, seed = config["seeds"], config["seed"]
    run_dir.mkdir(parents=True, exist_ok=True)
    log = CsvLog(run_dir / PROGRESS, CSV_FIELDS)
    states = a2c.init_seeds(algorithm, jax.random.key(seed), seeds)
    steps_done = 0
    if has_run(run_dir, config):
        states, steps_done = checkpoint.restore(run_dir / CHECKPOINT, states)
        frames_at = init_frames + steps_done * frames_per_step
        log.load()
        log.keep(lambda r: int(float(r["frames"])) <= frames_at)
    io.atomic_write_json(run_dir / STATE, {"key": config_key(config), "config": config})
    board = (TensorBoardLog(run_dir / "tensorboard", TENSORBOARD_FIELDS,
                            purge_step=init_frames + steps_done * frames_per_step if steps_done
                            else None) if tensorboard else None)
    run_chunk = a2c.compiled_run_steps(algorithm, chunk)
    start_wall = time.perf_counter()
    previous_wall = float(log.rows[-1]["wall_s"]) if log.rows else 0.0
    bar = tqdm(total=num_chunks * chunk * frames_per_step, initial=steps_done * frames_per_step,
               unit="frame", unit_scale=True, disable=not progress, leave=False,
               desc=f"{config['algo']} {config['env']}")
    try:
        while steps_done < num_chunks * chunk:
            tic = time.perf_counter()
            states, metrics = run_chunk(states)
            metrics = jax.tree.map(np.asarray, metrics)
            elapsed = time.perf_counter() - tic
            steps_done += chunk
            frames_done = init_frames + steps_done * frames_per_step
            fps = chunk * frames_per_step * seeds / elapsed
            new_rows = _rows(metrics, frames_done, fps,
                             previous_wall + time.perf_counter() - start_wall, seed)
            log.extend(new_rows)
            checkpoint.save(run_dir / CHECKPOINT, states, steps_done)
            if steps_done // chunk in snapshot_chunks(num_chunks):
                checkpoint.save(run_dir / SNAPSHOTS / f"{frames_done}.msgpack", states, steps_done)
            if board is not None:
                board.add(frames_done, new_rows)
            bar.update(chunk * frames_per_step)
            finished = [r["episode_return"] for r in new_rows if r["episodes"]]
            bar.set_postfix(ret=f"{np.mean(finished):.1f}" if finished else "-", fps=f"{fps:.0f}")
    except KeyboardInterrupt:
        bar.close()
        from gmrl.errors import Interrupted

        raise Interrupted(f"{config['algo']} on {config['env']} interrupted after "
                          f"{steps_done * frames_per_step} frames per seed; {run_dir / PROGRESS} "
                          "and the checkpoint are complete up to there") from None
    finally:
        if board is not None:
            board.close()
    bar.close()
    rows = [_typed(r) for r in log.rows]
    return {"summary": summarize(rows, config, algorithm, mgrl_config), "rows": rows}


def summarize(rows: Sequence[Mapping[str, Any]], config: Mapping[str, Any], algorithm,
              mgrl_config=None) -> dict[str, Any]:
    """Final return per seed (the mean over the last 10% of logging points, at least one), final
    meta-parameters and policy entropy, the training wall time, median frames/s and the settings
    actually used."""
    seeds = sorted({int(r["seed"]) for r in rows})
    per_seed, final_meta, final_entropy = [], {}, []
    for s in seeds:
        mine = [r for r in rows if int(r["seed"]) == s]
        tail = mine[-max(1, len(mine) // 10):]
        per_seed.append(float(np.nanmean([float(r["episode_return"]) for r in tail])))
        for name in ("gamma", "lam", "entropy_coef", "value_coef"):
            final_meta.setdefault(name, []).append(float(mine[-1][name]))
        final_entropy.append(float(mine[-1].get("entropy", float("nan"))))
    fps = [float(r["fps"]) for r in rows[len(seeds):]] or [float(r["fps"]) for r in rows]
    settings = {}
    if mgrl_config is not None:
        settings = {"num_envs": mgrl_config.num_envs, "num_steps": mgrl_config.num_steps,
                    "inner_steps": mgrl_config.inner_steps if config.get("algo") != "a2c" else 0,
                    "learning_rate": mgrl_config.learning_rate, "preset": mgrl_config.preset}
    return {**config, "frames_done": int(rows[-1]["frames"]), "final_return_per_seed": per_seed,
            "final_meta_params_per_seed": final_meta, "final_entropy_per_seed": final_entropy,
            "wall_s": max(float(r["wall_s"]) for r in rows),
            "median_fps": float(np.median(fps)),
            "frames_per_step": algorithm.frames_per_step, "settings": settings}


def run_point(config: Mapping[str, Any], run_dir: str | None = None, root: str | None = None,
              progress: bool = False, tensorboard: bool = False) -> dict[str, Any]:
    """`train` as a point function: in `run_dir`, or in ROOT/`study_run_dir(config)`."""
    folder = Path(run_dir) if run_dir is not None else Path(root) / study_run_dir(config)
    return train(config, folder, progress=progress, tensorboard=tensorboard)


def run(points: Sequence[Mapping[str, Any]], out: Path, *, run_dir: Path | None = None,
        backend: str = "local", address: str | None = None, progress: bool = True,
        tensorboard: bool = False, ray_init_kwargs=None) -> list[dict[str, Any]]:
    """Results of `points` from OUT/results.sqlite, training the missing ones: a single run in
    `run_dir`, else each in OUT/`study_run_dir(point)`."""
    from gmrl.runs import run_points

    point_fn = functools.partial(
        run_point, run_dir=None if run_dir is None else str(run_dir), root=str(out),
        progress=progress and backend == "local", tensorboard=tensorboard)
    return run_points(points, point_fn, out, backend=backend, address=address, progress=progress,
                      description="mgrl", ray_init_kwargs=ray_init_kwargs)


# --------------------------------------------------------------------------- study

STUDY_GAMES = ("Breakout-MinAtar", "Asterix-MinAtar", "Freeway-MinAtar", "SpaceInvaders-MinAtar")
DEFAULT_STUDY_GAMES = ("Breakout-MinAtar", "SpaceInvaders-MinAtar")
STUDY_FRAMES = {"Breakout-MinAtar": 10_000_000, "SpaceInvaders-MinAtar": 5_000_000}
"""Frames per seed of the study by game (other games: `DEFAULT_FRAMES`)."""
DEFAULT_FRAMES = 5_000_000
BIAS_ALGOS = ("mgrl", "mgrl-lvc")
"""Runs whose snapshots the study diagnoses (`gmrl.algos.mgrl_bias`)."""


def study_run_dir(config: Mapping[str, Any]) -> str:
    """runs/GAME/ALGO-KEY: a folder per configuration, so runs with other settings never mix."""
    return f"runs/{config['env']}/{config['algo']}-{config_key(config)[:10]}"


def study_frames(game: str, frames: int | None = None) -> int:
    """`frames` if given, else the study's frames for `game` (`STUDY_FRAMES`)."""
    return int(frames) if frames is not None else STUDY_FRAMES.get(game, DEFAULT_FRAMES)


def study_points(games: Sequence[str], frames: int | None, seeds: int, log_points: int,
                 seed: int = 0, overrides: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every algorithm on every game, for `frames` per seed (None: `study_frames` per game)."""
    return [run_config(algo, game, study_frames(game, frames), seeds, seed, log_points, overrides)
            for game in games for algo in ALGOS]


def _curves(rows: Sequence[Mapping[str, Any]], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(frames [P], values [S, P]) of one logged column."""
    seeds = sorted({int(r["seed"]) for r in rows})
    frames = np.array(sorted({int(r["frames"]) for r in rows}))
    values = np.full((len(seeds), len(frames)), np.nan)
    for r in rows:
        value = r[name]
        values[seeds.index(int(r["seed"])), np.searchsorted(frames, int(r["frames"]))] = \
            float(value) if value not in ("", "nan", None) else np.nan
    return frames, values


def _fill_nan(values: np.ndarray) -> np.ndarray:
    """Carry the last finite value forward along points (a window with no finished episode)."""
    values = values.copy()
    for s in range(values.shape[0]):
        for p in range(1, values.shape[1]):
            if not np.isfinite(values[s, p]):
                values[s, p] = values[s, p - 1]
    return np.nan_to_num(values)


PANELS = (("episode_return", "episode return"), ("entropy", "policy entropy (nats)"),
          ("gamma", "meta-learned γ"), ("lam", "meta-learned λ"),
          ("entropy_coef", "meta-learned entropy coefficient"),
          ("value_coef", "meta-learned value coefficient"))
"""The study figure's panels: logged column and title (the four meta-parameters are fixed for
a2c, which is drawn in the first two only)."""


def plot_study(out: Path, results: Mapping[tuple[str, str], Mapping[str, Any]],
               games: Sequence[str]) -> list[Path]:
    """GAME.png per game: return, policy entropy and the four meta-parameters over frames, mean
    ± 95% CI over seeds per algorithm. `results` maps (game, algo) to a run result. Figure
    objects only (the caller's matplotlib backend is untouched); PNGs written atomically."""
    from matplotlib.figure import Figure

    from gmrl.stats import mean_ci

    figures = []
    for game in games:
        fig = Figure(figsize=(15, 7.5))
        axes = fig.subplots(2, 3).ravel()
        for algo in ALGOS:
            result = results.get((game, algo))
            if not result or not result.get("rows"):
                continue
            for ax, (name, _) in zip(axes, PANELS, strict=True):
                if name not in ("episode_return", "entropy") and algo == "a2c":
                    continue
                if name not in result["rows"][0]:  # a log written before the column existed
                    continue
                frames, values = _curves(result["rows"], name)
                color = f"C{ALGOS.index(algo)}"  # the same colour for an algorithm everywhere
                if values.shape[0] >= 2:
                    mean, half = mean_ci(_fill_nan(values), axis=0)
                    ax.fill_between(frames, mean - half, mean + half, alpha=0.25, color=color)
                else:
                    mean = values[0]
                ax.plot(frames, mean, label=algo, color=color)
        for ax, (_, title) in zip(axes, PANELS, strict=True):
            ax.set_title(f"{game}: {title}", fontsize=10)
            ax.set_xlabel("frames per seed")
            if ax.lines:
                ax.legend(fontsize=8)
        fig.tight_layout()
        figures.append(io.atomic_savefig(fig, out / f"{game}.png", dpi=100))
    return figures


def _settings_line(summaries: Sequence[Mapping[str, Any]]) -> str:
    """The settings of the runs as stored, e.g. '64 envs × 5 steps, K = 3 inner steps (mgrl)'."""
    parts = []
    for key in sorted({(s["settings"].get("num_envs"), s["settings"].get("num_steps"))
                       for s in summaries if s.get("settings")}, key=str):
        parts.append(f"{key[0]} envs × {key[1]} steps")
    inner = sorted({s["settings"]["inner_steps"] for s in summaries
                    if s.get("settings") and s.get("algo") != "a2c"})
    if inner:
        parts.append("K = " + "/".join(map(str, inner)) + " inner steps (mgrl, mgrl-lvc)")
    lrs = sorted({s["settings"]["learning_rate"] for s in summaries if s.get("settings")})
    if lrs:
        parts.append("inner learning rate " + "/".join(f"{lr:g}" for lr in lrs))
    chosen = sorted({s["settings"].get("preset", "?") for s in summaries if s.get("settings")})
    if chosen:
        parts.append("preset " + "/".join(chosen))
    return ", ".join(parts)


def _duration(seconds: float | None) -> str:
    if not seconds:
        return "–"
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min {sec:02d} s"


def _seconds_at_median_fps(summary: Mapping[str, Any]) -> float | None:
    """frames × seeds / median frames/s: the run's training time without pauses or sharing."""
    if not summary.get("median_fps") or "frames_done" not in summary:
        return None
    return summary["frames_done"] * summary["seeds"] / summary["median_fps"]


def report(results: Mapping[tuple[str, str], Mapping[str, Any]], games: Sequence[str],
           out: Path | None = None,
           bias: Mapping[tuple[str, str], Sequence[Mapping[str, Any]]] | None = None) -> str:
    """report.md text: final return ± CI per game and algorithm, final γ and λ, frames/s; the
    header gives the settings the stored runs actually used."""
    from gmrl.stats import mean_ci

    summaries = [r["summary"] for r in results.values() if r]
    seeds = sorted({s["seeds"] for s in summaries})
    frames = sorted({s["frames"] for s in summaries})
    lines = ["# MGRL study: a2c vs mgrl vs mgrl-lvc", "",
             f"{'/'.join(map(str, seeds)) or '?'} seeds, {'/'.join(map(str, frames)) or '?'} frames "
             f"per seed, {_settings_line(summaries)}.",
             "Final return: per seed, the mean episode return over the last 10% of logging "
             "points; the table gives mean ± Student-t 95% half-width over seeds. γ and λ are the "
             "meta-learned values at the end, the entropy is the acting policy's over the last "
             "logging interval (means over seeds); wall: the run's elapsed training time (all "
             "seeds at once; it includes any time the process was paused or shared the CPU), and "
             "in brackets frames × seeds / median frames/s.", "",
             "| game | algo | final return | per seed | final γ | final λ | final entropy "
             "| median frames/s | wall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for game in games:
        for algo in ALGOS:
            result = results.get((game, algo))
            if not result:
                lines.append(f"| {game} | {algo} | (not run) | | | | | | |")
                continue
            summary = result["summary"]
            returns = np.array(summary["final_return_per_seed"])
            if len(returns) >= 2:
                mean, half = mean_ci(returns)
                cell = f"{mean:.2f} ± {half:.2f}"
            else:
                cell = f"{returns[0]:.2f}"
            meta = summary["final_meta_params_per_seed"]
            entropy = summary.get("final_entropy_per_seed")
            entropy = (f"{np.nanmean(entropy):.3f}" if entropy and np.isfinite(entropy).any()
                       else "–")
            lines.append(f"| {game} | {algo} | {cell} | {', '.join(f'{r:.1f}' for r in returns)} "
                         f"| {np.mean(meta['gamma']):.4f} | {np.mean(meta['lam']):.4f} "
                         f"| {entropy} | {summary['median_fps']:.0f} "
                         f"| {_duration(summary.get('wall_s'))} "
                         f"({_duration(_seconds_at_median_fps(summary))}) |")
    def total(game, seconds):
        return sum(seconds(results[game, a]["summary"]) or 0.0 for a in ALGOS
                   if results.get((game, a)))

    def wall(summary):
        return summary.get("wall_s")

    lines += ["", "Training wall time per game (the three algorithms, one after another): "
              + "; ".join(f"{g} {_duration(total(g, wall))} (at median frames/s "
                          f"{_duration(total(g, _seconds_at_median_fps))})"
                          for g in games if total(g, wall)) + "."]
    lines += claim_lines(results, games)
    if bias:
        lines += bias_lines(bias, games)
    figures = [f"`{g}.png`" for g in games if out is not None and (out / f"{g}.png").exists()]
    lines += ["", "Figures: " + (", ".join(figures) or "none yet")
              + " (return, policy entropy and the four meta-parameters over frames; mean ± 95% CI "
              "over seeds).", ""]
    return "\n".join(lines)


COMPARISONS = (("mgrl-lvc", "mgrl"), ("mgrl", "a2c"), ("mgrl-lvc", "a2c"))
"""Differences of final return reported per game; the first is the paper's claim (Liu, Feng et
al. 2022, §6): the lower-bias LVC inner surrogate improves MGRL's final return."""


def claim_lines(results: Mapping[tuple[str, str], Mapping[str, Any]],
                games: Sequence[str]) -> list[str]:
    """Per game, the differences of final return (Welch, 95% CI, Holm over the game's three
    comparisons) with the smallest difference detectable with 80% power, and a verdict line for
    the paper's claim (mgrl-lvc against mgrl)."""
    from gmrl.stats import detectable_difference, holm_adjust, welch
    from gmrl.stats import verdict as stats_verdict

    lines = ["", "## Differences of final return", ""]
    for game in games:
        finals = {a: np.asarray(r["summary"]["final_return_per_seed"], np.float64)
                  for a in ALGOS if (r := results.get((game, a)))}
        pairs = [(a, b) for a, b in COMPARISONS if a in finals and b in finals
                 and min(len(finals[a]), len(finals[b])) >= 2]
        if not pairs:
            lines.append(f"- {game}: not enough runs (two algorithms with ≥ 2 seeds each) to compare.")
            continue
        tests = [welch(finals[a], finals[b]) for a, b in pairs]
        adjusted = holm_adjust([t["p"] for t in tests])
        for (a, b), t, p in zip(pairs, tests, adjusted, strict=True):
            detectable = detectable_difference(t["se"], len(pairs))
            verdict = stats_verdict(t["diff"], p)
            line = (f"- {game}: {a} − {b} = {t['diff']:+.2f} ± {t['hw']:.2f} (p = {p:.3g}, Holm); "
                    f"detectable with 80% power: ±{detectable:.2f}.")
            if (a, b) == COMPARISONS[0]:
                line += (f" **Claim (LVC improves MGRL's final return): {a} {verdict}** "
                         f"({np.mean(finals[a]):.2f} vs {np.mean(finals[b]):.2f}"
                         + ("" if p <= 0.05 else
                            f"; this study could not have detected a difference under "
                            f"±{detectable:.2f}") + ").")
            lines.append(line)
    return lines


def _cell(comparison: Mapping[str, Any] | None, name: str) -> str:
    if comparison is None:
        return "–"
    low, high = comparison[f"{name}_ci"]
    return f"{comparison[name]:.2f} [{low:.2f}, {high:.2f}]"


def _floor(comparison: Mapping[str, Any] | None) -> str:
    return "–" if comparison is None else f"{comparison['noise_floor']:.2f}"


def bias_lines(bias: Mapping[tuple[str, str], Sequence[Mapping[str, Any]]],
               games: Sequence[str]) -> list[str]:
    """The bias diagnostic at the runs' snapshots (`diagnose_snapshots`): per state, the relative
    bias to the DiCE reference of single draws and of the large-batch mean (its Hessian bias
    alone) for both surrogates, the cosine of a single draw to it; per game a line counting the
    states where LVC's large-batch bias is lower / higher (95% CIs disjoint)."""
    lines = ["", "## Meta-gradient bias at the runs' snapshots", "",
             "`gmrl mgrl-bias` (docs/mgrl_bias.md) at the states each mgrl / mgrl-lvc run kept "
             "at 25, 50 and 75% of its frames (seed 0); both surrogates are drawn at every state "
             "on the same keys. Relative bias ‖E ĝ − g_ref‖/‖g_ref‖ [95% bootstrap CI] against "
             "the DiCE reference (it also differentiates the inner rollouts' sampling): of single "
             "meta-gradients (with their noise) and of the large-batch mean (the Hessian "
             "estimate's bias alone); cosine of a single draw to the reference. Noise floor: the "
             "relative bias the large-batch mean (vanilla) would show with no bias at all, from "
             "its and the reference's noise; a bias below it cannot be seen at that state.", "",
             "| game | run | frames | inner lr | single mgrl | single mgrl-lvc | large-batch mgrl "
             "| large-batch mgrl-lvc | noise floor | cosine mgrl | cosine mgrl-lvc |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for game in games:
        lower = higher = states = 0
        for algo in BIAS_ALGOS:
            for entry in bias.get((game, algo), ()):
                found = {(c["estimator"], c["reference"]): c for c in entry["result"]["comparisons"]}
                if not any(ref == "dice" for _, ref in found):
                    continue
                get = {e: found.get((e, "dice")) for e in
                       ("mgrl", "mgrl-lvc", "large-batch mgrl", "large-batch mgrl-lvc")}
                lines.append(
                    f"| {game} | {algo} | {entry['frames']} "
                    f"| {entry['result']['settings']['inner_lr']:.2g} "
                    f"| {_cell(get['mgrl'], 'rel_bias')} | {_cell(get['mgrl-lvc'], 'rel_bias')} "
                    f"| {_cell(get['large-batch mgrl'], 'rel_bias')} "
                    f"| {_cell(get['large-batch mgrl-lvc'], 'rel_bias')} "
                    f"| {_floor(get['large-batch mgrl'])} "
                    f"| {_cell(get['mgrl'], 'cosine')} | {_cell(get['mgrl-lvc'], 'cosine')} |")
                vanilla, lvc = get["large-batch mgrl"], get["large-batch mgrl-lvc"]
                if vanilla and lvc:
                    states += 1
                    lower += lvc["rel_bias_ci"][1] < vanilla["rel_bias_ci"][0]
                    higher += lvc["rel_bias_ci"][0] > vanilla["rel_bias_ci"][1]
        if states:
            lines.append(f"| **{game}** | LVC's large-batch bias to DiCE: lower at {lower}, higher "
                         f"at {higher}, undecided at {states - lower - higher} of {states} states "
                         "(95% CIs disjoint) | | | | | | | | | |")
    return lines


def diagnose_snapshots(out: Path, points: Sequence[Mapping[str, Any]], settings=None, *,
                       progress: bool = True) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """`gmrl.algos.mgrl_bias.diagnose` (both surrogates, seed 0) at every snapshot of the mgrl
    and mgrl-lvc runs among `points` (in OUT/`study_run_dir`); each result is kept as
    RUN/bias/FRAMES/bias.json (+ bias.md) and read back on later calls. Returns, per (game,
    algo), [{"frames", "result", "seconds"}] in frame order."""
    import json

    import jax
    from tqdm.auto import tqdm

    from gmrl.algos import mgrl_bias

    found: dict[tuple[str, str], list[dict[str, Any]]] = {}
    todo = [(p, f) for p in points if p["algo"] in BIAS_ALGOS
            for f in snapshot_frames(Path(out) / study_run_dir(p))]
    for point, frames in tqdm(todo, desc="mgrl-bias", disable=not progress or not todo,
                              leave=False):
        run_dir = Path(out) / study_run_dir(point)
        target = run_dir / "bias" / str(frames)
        if (target / "bias.json").is_file():
            entry = json.loads((target / "bias.json").read_text(encoding="utf-8"))
        else:
            started = time.perf_counter()
            _, config, state = load_run_state(run_dir, 0, snapshot=frames)
            result = mgrl_bias.diagnose(config, state, jax.random.key(frames), settings)
            entry = {"frames": frames, "result": result,
                     "seconds": time.perf_counter() - started}
            io.atomic_write_json(target / "bias.json", entry)
            io.atomic_write_text(target / "bias.md", mgrl_bias.report_markdown(
                result, mgrl_bias.report_title(point["algo"], point["env"],
                                               f"snapshot at {frames} frames", 0)))
        found.setdefault((point["env"], point["algo"]), []).append(entry)
    return found


def run_study(out: Path, games: Sequence[str], frames: int | None, seeds: int, log_points: int,
              overrides: Mapping[str, Any] | None = None, *, bias_settings=None,
              backend: str = "local", address: str | None = None, progress: bool = True,
              ray_init_kwargs=None) -> Path:
    """Every algorithm on every game (finished runs come from the store, interrupted ones
    continue from their checkpoints), the bias diagnostic at the mgrl runs' snapshots
    (`bias_settings`: a `gmrl.algos.mgrl_bias.BiasSettings`; results kept, so resumable too),
    then the figures and report.md."""
    points = study_points(games, frames, seeds, log_points, overrides=overrides)
    results = run(points, out, backend=backend, address=address, progress=progress,
                  ray_init_kwargs=ray_init_kwargs)
    by_run = {(p["env"], p["algo"]): r for p, r in zip(points, results, strict=True)}
    bias = diagnose_snapshots(out, points, bias_settings, progress=progress)
    plot_study(out, by_run, games)
    return io.atomic_write_text(out / "report.md", report(by_run, games, out, bias))


# --------------------------------------------------------------------------- run folders

def load_run_state(run_dir, seed_index: int = 0, initial: bool = False,
                   snapshot: int | None = None):
    """(run point, MGRLConfig, MGRLState of one seed) from a folder of `gmrl mgrl --out RUN_DIR`:
    run.json (or config.json) and checkpoint.msgpack; `initial` gives the state before training,
    `snapshot` the state kept at that many frames (`gmrl.runs.mgrl.SNAPSHOT_FRACTIONS`)."""
    import json

    import jax

    from gmrl.algos import a2c
    from gmrl.algos.mgrl_bias import ESTIMATORS
    from gmrl.runs import checkpoint

    run_dir = Path(run_dir)
    require(run_dir.is_dir(), f"{run_dir} is not a folder; give a run folder written by "
                              "`gmrl mgrl --out RUN_DIR`")
    point = None
    for name in (STATE, "config.json"):
        path = run_dir / name
        if path.is_file():
            try:
                point = json.loads(path.read_text(encoding="utf-8")).get("config")
            except (OSError, ValueError, AttributeError):
                point = None
            if isinstance(point, dict):
                break
    require(isinstance(point, dict) and point.get("study") == "mgrl",
            f"{run_dir} holds no MGRL run (run.json or config.json of `gmrl mgrl --out`)")
    require(point.get("algo") in ESTIMATORS,
            f"{run_dir} holds a run of {point.get('algo')!r}; allowed: {', '.join(ESTIMATORS)}")
    algorithm, config = algorithm_of(point)
    require(0 <= seed_index < point["seeds"],
            f"--seed-index must lie in [0, {point['seeds']}), got {seed_index}")
    require(not (initial and snapshot is not None), "give --initial or --snapshot, not both")
    if initial:
        states = a2c.init_seeds(algorithm, jax.random.key(point["seed"]), point["seeds"])
    elif snapshot is not None:
        kept = snapshot_frames(run_dir)
        require(snapshot in kept, f"{run_dir} keeps no snapshot at {snapshot} frames; kept: "
                                  f"{', '.join(map(str, kept)) or 'none'}")
        states, _ = checkpoint.restore(run_dir / SNAPSHOTS / f"{snapshot}.msgpack",
                                       state_template(algorithm, point["seeds"]))
    else:
        require((run_dir / CHECKPOINT).is_file(),
                f"{run_dir} has no {CHECKPOINT} (the run saves one at each log point)")
        states, _ = checkpoint.restore(run_dir / CHECKPOINT,
                                       state_template(algorithm, point["seeds"]))
    return point, config, jax.tree.map(lambda v: v[seed_index], states)


def state_template(algorithm, seeds: int):
    import jax

    """Arrays shaped like `seeds` initial states (from `jax.eval_shape`: nothing is compiled)."""
    shapes = jax.eval_shape(lambda k: jax.vmap(algorithm.init)(jax.random.split(k, seeds)),
                            jax.random.key(0))

    def like(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            flat = jax.random.split(jax.random.key(0), max(1, int(np.prod(leaf.shape))))
            return flat.reshape(leaf.shape)
        return np.zeros(leaf.shape, leaf.dtype)

    return jax.tree.map(like, shapes)
