"""`gmrl.check`: run a user's meta-gradient function under the exact oracle and diagnose it.

The user's R estimates per MDP are compared with the exact float64 meta-gradient of the T-step
objective J_T the episodes estimate (`metagrad.exact_meta_gradient`, finite oracle, no bootstrap),
giving bias2 ± CI, variance, corr and MSE (`gmrl.stats`), and with the expectations of the known
explanations computed on the same tasks with the user's recorded sample sizes
(`gmrl.check.candidates`), which `gmrl.check.diagnosis` tests. By default the check is
sequential: while several labels are consistent it draws as many repeats again (R, 2R, 4R, ... per
MDP, look j testing at α/(j(j+1))) as long as the next look fits in the time budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import enable_x64

from gmrl import metagrad as mg
from gmrl import stats
from gmrl.check import candidates as cand
from gmrl.check.diagnosis import Diagnosis, diagnose
from gmrl.check.task import JaxTask, Recorder, SampleError, Task
from gmrl.envs import tabular
from gmrl.errors import InputError, require
from gmrl.evaluate import problem_set

JAX_ATTRIBUTE = "__gmrl_jax__"


def jax_function(fn: Callable) -> Callable:
    """Mark `fn(task, key)` as a JAX function: gmrl vmaps and jits it over repeats and MDPs."""
    setattr(fn, JAX_ATTRIBUTE, True)
    return fn


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """What `check` found. Arrays are float64 NumPy; M MDPs, R repeats, S states, A actions.

    summary: `gmrl.stats.summarize` of the estimates against `exact` (pooled figures and `per_mdp`);
    exact [M, S, A]; estimates [M, R, S, A]; candidates: name -> expected meta-gradient [M, S, A];
    calls: the episode counts of the sample calls of the first estimate, grouped by the θ they
    were drawn at; diagnosis; seconds: user (all estimates), per_estimate, candidates, total.
    """

    config: dict
    summary: dict
    exact: np.ndarray
    estimates: np.ndarray
    candidates: dict
    calls: list
    diagnosis: Diagnosis
    seconds: dict
    unit = "mdp"
    """What the rows of the per-item table are (`check_lola`: parameter points)."""

    @property
    def label(self) -> str:
        return self.diagnosis.label

    @property
    def bias2(self) -> tuple[float, float, float]:
        """Pooled bias2 and its 95% CI (low, high)."""
        s = self.summary
        return s["bias2"], s["bias2_ci_low"], s["bias2_ci_high"]

    @property
    def variance(self) -> float:
        return self.summary["variance"]

    @property
    def corr(self) -> float:
        return self.summary["corr"]

    @property
    def mse(self) -> float:
        """Mean over MDPs, repeats and coordinates of (ĝ − g*)² (bias² + variance)."""
        return float(np.mean((self.estimates - self.exact[:, None]) ** 2))

    def to_json(self) -> dict:
        summary = {k: v for k, v in self.summary.items() if k != "per_mdp"}
        return {"config": self.config, "summary": summary | {"mse": self.mse},
                "per_mdp": self.summary["per_mdp"], "diagnosis": self.diagnosis.to_json(),
                "calls": self.calls, "seconds": self.seconds, "exact_meta_gradient": self.exact,
                "mean_estimate": self.estimates.mean(1),
                "candidates": self.candidates}

    def report(self) -> str:
        """Statistics, per MDP and pooled, then the diagnosis (what `gmrl check` prints)."""
        s, per = self.summary, self.summary["per_mdp"]
        lines = [f"{self.unit:>5} {'corr':>8} {'variance':>11} {'bias2 ± 95% CI':>24}"]
        for m in range(len(per["corr"])):
            half_m = (per['bias2_ci_high'][m] - per['bias2_ci_low'][m]) / 2
            lines.append(f"{m:>5} {per['corr'][m]:>8.4f} {per['variance'][m]:>11.4g} "
                         f"{per['bias2'][m]:>12.4g} ± {half_m:<10.3g}")
        half = (s["bias2_ci_high"] - s["bias2_ci_low"]) / 2
        lines.append(f"{'all':>5} {s['corr']:>8.4f} {s['variance']:>11.4g} "
                     f"{s['bias2']:>12.4g} ± {half:<10.3g}   mse {self.mse:.4g}")
        d = self.diagnosis
        lines += [""] + [f"look {k['look']}: {k['repeats']} repeats per {self.unit}, level "
                         f"{k['level']:.3g}: {k['label']}"
                         + (f" ({', '.join(k['labels'])})" if k["label"] == "undetermined" else "")
                         + f" [{k['seconds']:.0f} s]" for k in self.config.get("looks", [])]
        lines += [f"diagnosis: {d.message}", f"rule: {d.rule}"]
        lines += [f"  consistent  {t.describe()}" for t in d.consistent]
        lines += [f"  rejected    {t.describe()}" for t in d.rejected]
        lines += [f"note: {n}" for n in d.notes]
        return "\n".join(lines)


def _user_location(fn: Callable, err: BaseException) -> str:
    """' (at file.py:LINE)' for the innermost frame of the user's file, if any."""
    try:
        path = inspect.getsourcefile(fn)
    except TypeError:
        path = None
    frames = traceback.extract_tb(err.__traceback__)
    mine = [f for f in frames if path and os.path.abspath(f.filename) == os.path.abspath(path)]
    frame = mine[-1] if mine else None
    return f" (at {os.path.basename(frame.filename)}:{frame.lineno})" if frame else ""


_USER = {"active": False, "timeout": None, "sigint": False}
"""State of `user_code`: whether it is active, the per-call timeout, whether a real Ctrl-C came."""


class _Timeout(BaseException):
    """Raised by SIGALRM inside user code (a BaseException: `except Exception` cannot swallow it)."""


@contextlib.contextmanager
def user_code(timeout: float | None = None):
    """Run user code in the block under guards (what `gmrl check` does): each call of the user's
    function (`call_user`) is stopped after `timeout` seconds (SIGALRM; main thread only), and a
    real Ctrl-C is told apart from a KeyboardInterrupt the user's code raises itself."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None

    def on_sigint(signum, frame):
        _USER["sigint"] = True
        raise KeyboardInterrupt

    if main:
        signal.signal(signal.SIGINT, on_sigint)
    _USER.update(active=True, timeout=timeout, sigint=False)
    try:
        yield
    finally:
        _USER.update(active=False, timeout=None, sigint=False)
        if main:
            signal.signal(signal.SIGINT, previous)


def call_user(call: Callable[[], Any], describe: str, calls: int = 1) -> Any:
    """call() under `user_code`'s guards: SystemExit, a KeyboardInterrupt that is no Ctrl-C and
    a call longer than `calls` × the timeout become one InputError naming `describe`."""
    timeout = _USER["timeout"] if _USER["active"] else None
    alarm = timeout is not None and threading.current_thread() is threading.main_thread()
    if alarm:
        def on_alarm(signum, frame):
            raise _Timeout

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout * calls)
    try:
        return call()
    except _Timeout:
        raise InputError(f"{describe} ran longer than {timeout * calls:g} s (--timeout {timeout:g} "
                         "s per call); make it faster or give a larger --timeout") from None
    except SystemExit as err:
        raise InputError(f"{describe} called sys.exit({err.code!r}); return an array (or raise an "
                         "exception) instead") from None
    except KeyboardInterrupt:
        if _USER["sigint"] or not _USER["active"]:
            raise
        raise InputError(f"{describe} raised KeyboardInterrupt (no Ctrl-C was pressed)") from None
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _call(fn: Callable, task, rng, where: str):
    name = getattr(fn, "__name__", "function")
    return call_user(lambda: _call_checked(fn, task, rng, where), f"your function {name}{where}")


def _call_checked(fn: Callable, task, rng, where: str):
    try:
        return fn(task, rng)
    except SampleError as err:
        raise _user_error(fn, err, where) from None
    except InputError:
        raise
    except Exception as err:
        raise _user_error(fn, err, where) from None


def _numpy(value: Any) -> Any:
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().numpy()
    if isinstance(value, tuple | list):  # e.g. both players' gradients as (g1, g2)
        return [_numpy(v) for v in value]
    return value


def _real_array(value: Any, name: str, where: str, expected: str, shape) -> np.ndarray:
    """float64 array of `value`, or InputError for None, complex, object or ragged values."""
    wrong = f"not an array of real numbers of shape {expected} = {shape}"
    require(value is not None, f"{name}{where} returned None, {wrong} (a missing return?)")
    try:
        array = np.asarray(_numpy(value))
    except (TypeError, ValueError):
        raise InputError(f"{name}{where} returned {type(value).__name__}, {wrong}") from None
    require(array.dtype.kind != "c", f"{name}{where} returned complex numbers (dtype "
                                     f"{array.dtype}); a meta-gradient is real")
    require(array.dtype.kind in "biuf", f"{name}{where} returned an array of dtype {array.dtype}, "
                                        f"{wrong}")
    return array.astype(np.float64)


def _as_estimate(value: Any, shape: tuple[int, ...], name: str, where: str,
                 expected: str = "[S, A]") -> np.ndarray:
    array = _real_array(value, name, where, expected, shape)
    require(array.shape == shape,
            f"{name}{where} returned shape {array.shape}; expected {expected} = {shape}")
    require(bool(np.all(np.isfinite(array))), f"{name}{where} returned NaN or infinity")
    return array


def _python_estimates(fn, tasks: list, repeats: int, seed: int, progress: bool,
                      shape: tuple[int, ...] | None = None, expected: str = "[S, A]",
                      unit: str = "MDP"):
    """Call fn(task, rng) `repeats` times per task (rng = default_rng([seed, m, r])); returns
    (estimates [M, R, *shape], the first estimate's sample-call groups, notes)."""
    from tqdm.auto import tqdm

    name = getattr(fn, "__name__", "function")
    count = len(tasks)
    shape = tasks[0].R.shape if shape is None else shape
    out = np.empty((count, repeats) + shape)
    groups, notes = None, []
    bar = tqdm(total=count * repeats, desc=f"gmrl check {name}", unit="estimate",
               disable=not progress, leave=False)
    with bar:
        for m, task in enumerate(tasks):
            for r in range(repeats):
                task.recorder.sizes.clear()
                task.recorder.thetas.clear()
                rng = np.random.default_rng([seed, m, r])
                where = f" ({unit} {m}, repeat {r})"
                out[m, r] = _as_estimate(_call(fn, task, rng, where), shape, name, where, expected)
                require(task.recorder.sizes, f"{name}{where} never called task.sample: gmrl "
                        "cannot tell which sample sizes its estimate used")
                current = task.recorder.groups()
                if groups is None:
                    groups = current
                elif current != groups and not notes:
                    notes.append(f"the sample calls differ between estimates ({groups} first, "
                                 f"{current} at {unit} {m}, repeat {r}); the candidates use the first")
                bar.update()
    return out, groups, notes


def _jax_estimates(fn, mdps: tabular.TabularMDP, phis, horizon, steps, lr, problem, repeats, seed):
    """The tabular JAX path: `jax_estimates` over MDPs (a `JaxTask` per MDP)."""
    def task_of(item, recorder):
        mdp, phi = item
        return JaxTask(mdp.P, mdp.R, mdp.gamma, mdp.init_state, horizon, steps, lr, problem, phi,
                       recorder)

    out, probe, notes, first, steady = jax_estimates(fn, task_of, (mdps, phis), phis.shape[0],
                                                     phis.shape[1:], repeats, seed)
    return out, probe.groups(), notes, first, steady


def jax_estimates(fn, task_of, items, count: int, shape: tuple[int, ...], repeats: int, seed: int,
                  expected: str = "[S, A]"):
    """Run a JAX user function once eagerly (recording its sample calls), then jit(vmap(vmap))
    over `repeats` keys and the `count` items (a pytree with a leading axis; `task_of(item,
    recorder)` builds the task). Returns (estimates [count, R, *shape], the eager run's recorder,
    notes, seconds of the first compiled call, seconds of a second one)."""
    name = getattr(fn, "__name__", "function")
    shape = tuple(shape)
    probe = Recorder(probe=True)
    first = jax.tree.map(lambda x: x[0], items)
    where = " (first estimate, run eagerly)"
    _as_estimate(_call(fn, task_of(first, probe), jax.random.key(seed), where), shape, name, where,
                 expected)
    jax.effects_barrier()
    require(probe.sizes, f"{name} never called task.sample: gmrl cannot tell which sample sizes "
            "its estimate used")
    traced = Recorder()

    def one(key, item):
        return jnp.asarray(fn(task_of(item, traced), key))

    batched = jax.jit(jax.vmap(jax.vmap(one, in_axes=(0, None)), in_axes=(0, 0)))
    keys = jax.random.split(jax.random.key(seed + 1), (count, repeats))
    where = " (vmapped over repeats and items)"
    started = time.perf_counter()
    out = call_user(lambda: _run_batched(batched, keys, items, fn, where),
                    f"your function {name}{where}", count * repeats)
    first_seconds = time.perf_counter() - started
    out = _real_array(out, name, where, expected, shape)
    require(out.shape == (count, repeats) + shape,
            f"{name}{where} returned shape {out.shape[2:]}; expected {expected} = {shape}")
    require(bool(np.all(np.isfinite(out))), f"{name}{where} returned NaN or infinity")
    notes = []
    if traced.sizes != probe.sizes:
        notes.append(f"traced sample sizes {traced.sizes} differ from the eager run's {probe.sizes}")
    # the steady-state cost per estimate: a second, compiled call
    started = time.perf_counter()
    keys = jax.random.split(jax.random.key(seed + 2), (count, repeats))
    call_user(lambda: _run_batched(batched, keys, items, fn, where), f"your function {name}{where}",
              count * repeats)
    steady = time.perf_counter() - started
    return out, probe, notes, first_seconds, steady


def _user_error(fn: Callable, err: Exception, where: str, hint: str = "") -> InputError:
    """One line for an exception from the user's function: a misused `task.sample` (SampleError) as
    its own message, anything else as 'your function NAME raised TYPE: first line (file:line)'."""
    name = getattr(fn, "__name__", "function")
    if isinstance(err, SampleError):
        return InputError(f"{name}{where}: {err}")
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return InputError(f"your function {name} raised {type(err).__name__}"
                      f"{': ' + message if message else ''}{_user_location(fn, err)}{where}{hint}")


def _run_batched(batched, keys, items, fn, where: str):
    try:
        return batched(keys, items).block_until_ready()
    except SampleError as err:
        raise _user_error(fn, err, where) from None
    except InputError:
        raise
    except Exception as err:
        raise _user_error(fn, err, where, "; a function marked as JAX must be traceable (jit/vmap)") from None


_CACHE: dict = {}
_CACHE_KEEP = 4


def _candidate_expectations(mdps, phis, problem, lr, horizon, structure, variants, repeats, seed):
    """`candidates.expectations`, memoised on its inputs (a few entries): checking several
    functions on the same tasks in one process computes the candidates once."""
    digest = tuple(np.asarray(x).tobytes() for x in (mdps.P, mdps.R, mdps.gamma, mdps.init_state, phis))
    key = (digest, problem, lr, horizon, structure, variants, repeats, seed)
    if key not in _CACHE:
        while len(_CACHE) >= _CACHE_KEEP:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = cand.expectations(mdps, phis, problem, lr, horizon, structure, variants,
                                        repeats, seed)
    return _CACHE[key]


def _problem(seed, cfg, mdps, states, actions, gamma, mdp, theta0):
    if isinstance(theta0, str):
        require(theta0 in ("zeros", "normal"),
                f"theta0 must be 'zeros', 'normal' or an [S, A] array, got {theta0!r}")
    return problem_set(seed, cfg, mdps, states, actions, gamma, mdp, theta0=theta0)


BUDGET = 120.0
"""`check`'s default time budget in seconds: it keeps drawing while the label is undetermined."""
LOOK_SEED = 1_000_003
"""Look j ≥ 2 draws its repeats with seed + LOOK_SEED·(j − 1) (independent of the earlier looks')."""


def check(fn: Callable, problem: str = "maml", steps: int = 1, lr: float = 10.0, mdps: int = 10,
          repeats: int = 50, theta0: Any = "zeros", seed: int = 0, jax: bool | None = None,
          horizon: int = 20, gamma: float = 0.8, states: int = 20, actions: int = 5,
          mdp: tabular.TabularMDP | None = None, candidate_repeats: int | None = None,
          alpha: float = 0.05, progress: bool = True, budget: float | None = BUDGET) -> CheckResult:
    """Run `fn(task, rng)` `repeats` times on each of `mdps` tasks and diagnose its meta-gradient.

    problem "maml" (φ = θ_0, `theta0` "zeros" | "normal" | [S, A]) or "lirpg" (φ = 0 intrinsic
    reward, θ_0 = 0); K = `steps` inner steps of size α = `lr`; random reference MDPs (S, A, γ,
    T = `horizon`) or the user's `mdp`. `jax`: True for a JAX function (vmapped and jitted), False
    for a Python one (called in a loop, rng a numpy Generator); None reads the `jax_function`
    mark. `candidate_repeats`: Monte-Carlo draws per MDP for each explanation's expectation
    (default max(1000, 20·repeats)). `alpha`: the bound on the probability of a wrong label.
    `budget` (seconds, from the start): while the label is `undetermined`, draw as many repeats
    again (look j tests at α/(j(j+1)), `diagnosis.look_level`) if the next look is predicted to end
    within it; None or 0: one look at level α. Raises InputError for bad arguments or a user
    function that raises, returns a wrong shape or NaN, or misuses `task.sample`.
    """
    use_jax = getattr(fn, JAX_ATTRIBUTE, False) if jax is None else bool(jax)
    require(callable(fn), f"fn must be callable, got {type(fn).__name__}")
    require(isinstance(repeats, int) and repeats >= 3,
            f"repeats must be an integer >= 3 (bias2 needs 3), got {repeats!r}")
    require(isinstance(mdps, int) and mdps >= 1, f"mdps must be an integer >= 1, got {mdps!r}")
    require(0 < alpha < 1, f"alpha must be in (0, 1), got {alpha}")
    require(budget is None or (isinstance(budget, int | float) and budget >= 0 and math.isfinite(budget)),
            f"budget must be a number of seconds >= 0, got {budget!r}")
    candidate_repeats = max(1000, 20 * repeats) if candidate_repeats is None else candidate_repeats
    require(isinstance(candidate_repeats, int) and candidate_repeats >= 10,
            f"candidate_repeats must be an integer >= 10, got {candidate_repeats!r}")
    sequential = bool(budget)
    cfg = mg.MetaGradConfig(problem=problem, steps=steps, lr=float(lr), horizon=horizon,
                            oracle="finite")
    started = time.perf_counter()
    mdp_set, phis = _problem(seed, cfg, mdps, states, actions, gamma, mdp, theta0)
    count = phis.shape[0]
    shape = phis.shape[1:]
    tasks = None if use_jax else [
        Task(np.asarray(mdp_set.P[m]), np.asarray(mdp_set.R[m]), float(mdp_set.gamma[m]),
             int(mdp_set.init_state[m]), horizon, steps, float(lr), problem, np.asarray(phis[m]))
        for m in range(count)]

    def draw(n: int, look_seed: int):
        """n more repeats per MDP: (estimates [M, n, S, A], call groups, notes, seconds of the
        user's function, seconds per estimate at steady state)."""
        user_started = time.perf_counter()
        if use_jax:
            with enable_x64(True):
                out, calls, found, first, steady = _jax_estimates(
                    fn, mdp_set, phis, horizon, steps, float(lr), problem, n, look_seed)
            return out, calls, found, first, steady / (count * n)
        out, calls, found = _python_estimates(fn, tasks, n, look_seed, progress)
        spent = time.perf_counter() - user_started
        return out, calls, found, spent, spent / (count * n)

    estimates, groups, notes, user_seconds, per_estimate = draw(repeats, seed)
    fixed = user_seconds if use_jax else 0.0  # a JAX look traces and compiles again
    with enable_x64(True):  # after the user's function: its errors come at once
        exact = np.asarray(mg.batched_exact(cfg, "dice")(mdp_set, phis))
    structure, structure_notes = cand.structure_from_calls(groups, steps)
    cand_started = time.perf_counter()
    variants = cand.variants(problem)
    means, mean_vars = _candidate_expectations(mdp_set, phis, problem, float(lr), horizon, structure,
                                               tuple(variants), candidate_repeats, seed + 7919)
    cand_seconds = time.perf_counter() - cand_started
    notes = list(notes) + structure_notes
    if problem == "lirpg":
        notes.append("lirpg: the vanilla log-prob and LVC surrogates have the same θ-gradient as "
                     "DiCE / Loaded DiCE for every φ, so they are not separate explanations here")
    names, labels = [v.name for v in variants], [v.label for v in variants]
    look = 1
    diagnosis = diagnose(estimates.reshape(count, -1, shape[0] * shape[1]), means, mean_vars, names,
                         labels, alpha, notes, look=look if sequential else None)
    looks = [{"look": look, "repeats": repeats, "level": diagnosis.level, "label": diagnosis.label,
              "labels": list(diagnosis.labels), "seconds": time.perf_counter() - started}]
    while sequential and diagnosis.label == "undetermined":
        more = estimates.shape[1]  # double the repeats per MDP
        predicted = 1.25 * more * count * per_estimate + fixed
        if time.perf_counter() - started + predicted > budget:
            break
        look += 1
        new, _, found, spent, _ = draw(more, seed + LOOK_SEED * (look - 1))
        user_seconds += spent
        estimates = np.concatenate([estimates, new], axis=1)
        notes += [n for n in found if n not in notes]
        diagnosis = diagnose(estimates.reshape(count, -1, shape[0] * shape[1]), means, mean_vars,
                             names, labels, alpha, notes, look=look)
        looks.append({"look": look, "repeats": estimates.shape[1], "level": diagnosis.level,
                      "label": diagnosis.label, "labels": list(diagnosis.labels),
                      "seconds": time.perf_counter() - started})
    total_repeats = estimates.shape[1]
    flat = estimates.reshape(count, total_repeats, -1)
    summary = stats.summarize(flat, exact.reshape(count, -1))
    config = {"function": getattr(fn, "__name__", "function"), "path": "jax" if use_jax else "python",
              "problem": problem, "steps": steps, "lr": float(lr), "mdps": count,
              "repeats": total_repeats, "first_repeats": repeats,
              "theta0": theta0 if isinstance(theta0, str) else np.asarray(theta0).tolist(),
              "seed": seed, "horizon": horizon, "gamma": float(np.asarray(mdp_set.gamma)[0]),
              "states": int(shape[0]), "actions": int(shape[1]),
              "candidate_repeats": candidate_repeats, "alpha": alpha,
              "budget": budget, "looks": looks,
              "structure": {"value_sizes": structure.value_sizes,
                            "jacobian_sizes": structure.jacobian_sizes},
              "truth": "exact float64 meta-gradient of the T-step objective J_T (no bootstrap)"}
    return CheckResult(
        config=config, summary=summary, exact=exact, estimates=estimates,
        candidates={v.name: means[:, i].reshape((count,) + shape) for i, v in enumerate(variants)},
        calls=groups, diagnosis=diagnosis,
        seconds={"user": user_seconds, "per_estimate": per_estimate, "candidates": cand_seconds,
                 "total": time.perf_counter() - started})
