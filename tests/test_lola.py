"""LOLA-DiCE: exact LOLA gradient, unbiasedness, off-policy weights, determinism, CLI."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmrl import cli as gmrl_cli
from gmrl.algos import lola
from gmrl.envs import ipd
from gmrl.errors import InputError
from gmrl.runs import lola as lola_runs


def _thetas(seed, scale=1.0):
    return np.random.default_rng(seed).normal(0.0, scale, (2, ipd.NUM_STATES))


def _np_values(theta1, theta2, gamma=0.96):
    """Independent numpy transcription of the closed-form values (player 2's CD/DC swapped)."""
    p1 = 1 / (1 + np.exp(-theta1))
    p2 = (1 / (1 + np.exp(-theta2)))[[0, 1, 3, 2, 4]]

    def phi(x, y):
        return np.stack([x * y, x * (1 - y), (1 - x) * y, (1 - x) * (1 - y)], -1)

    occupancy = np.linalg.solve((np.eye(4) - gamma * phi(p1[1:], p2[1:])).T, phi(p1[0], p2[0]))
    return occupancy @ np.array([[-1, -1], [-3, 0], [0, -3], [-2, -2]], float)


def _fd_grad(f, x, h):
    return np.array([(f(x + h * e) - f(x - h * e)) / (2 * h) for e in np.eye(len(x))])


def _np_lola_gradient(thetas, player, lr, steps):
    """d/dθ_own V_own(θ_own, θ_opp after `steps` FD-gradient steps): nested central differences."""
    def value(own, opp, who):
        pair = (own, opp) if player == 0 else (opp, own)
        return _np_values(*pair)[who]

    def outer(own):
        opp = thetas[1 - player].copy()
        for _ in range(steps):
            opp = opp + lr * _fd_grad(lambda o: value(own, o, 1 - player), opp, 1e-5)
        return value(own, opp, player)

    return _fd_grad(outer, thetas[player].copy(), 1e-3)


@pytest.mark.parametrize("steps", [1, 2])
def test_exact_lola_gradient_matches_finite_differences(steps):
    thetas = _thetas(0)
    cfg = lola.LolaConfig(lookaheads=steps)
    with jax.enable_x64(True):
        got = np.asarray(lola.exact_lola_gradients(jnp.asarray(thetas), cfg))
    for player in (0, 1):
        want = _np_lola_gradient(thetas, player, 0.3, steps)
        np.testing.assert_allclose(got[player], want, rtol=1e-4, atol=1e-3)
    # the lookahead matters: the naive gradient (no opponent step) is measurably different
    naive = _np_lola_gradient(thetas, 0, 0.3, 0)
    assert np.max(np.abs(naive - got[0])) > 1e-2


def _sampled_meta_gradients(cfg, player, thetas, values, keys):
    def one(key):
        with jax.enable_x64(True):
            return jax.grad(lambda t: lola.meta_objective(
                t, player, thetas[1 - player], values, key, None, cfg)[0])(thetas[player])
    with jax.enable_x64(True):
        return np.asarray(jax.jit(jax.vmap(one))(keys), np.float64)


def test_meta_gradient_with_exact_step_value_is_unbiased():
    """Hessian part and outer part sampled (DiCE + learned-value baseline), compositional exact:
    no compositional bias, so the mean estimate matches the exact LOLA gradient (|z| < 4)."""
    thetas = jnp.asarray(_thetas(1), jnp.float32)
    values = jnp.asarray(np.random.default_rng(2).normal(-3, 1, (2, 5)), jnp.float32)
    # γ = 0.6 and T = 40 (γ^T ≈ 1e-9): no truncation bias and a test with power
    cfg = lola.LolaConfig(comp=None, hessian=256, outer=256, gamma=0.6, horizon=40)
    grads = _sampled_meta_gradients(cfg, 1, thetas, values,
                                    jax.random.split(jax.random.key(3), 24))
    with jax.enable_x64(True):
        exact = np.asarray(lola.exact_lola_gradients(thetas, cfg), np.float64)[1]
    se = grads.std(0, ddof=1) / np.sqrt(len(grads))
    z = (grads.mean(0) - exact) / se
    assert np.all(np.abs(z) < 4), z
    # power: the naive gradient (no lookahead) is rejected
    with jax.enable_x64(True):
        naive = np.asarray(lola.exact_lola_gradients(
            thetas, dataclasses.replace(cfg, inner_lr=1e-9)), np.float64)[1]
    assert np.any(np.abs((grads.mean(0) - naive) / se) > 4)


def test_dice_lola_gradient_approaches_exact_with_large_batches():
    """Fully sampled (compositional bias included) at γ = 0.6, T = 40, where the variance allows a
    fast test: per-estimate correlation with the exact gradient rises from ≈0 to > 0.9."""
    thetas = jnp.asarray(_thetas(5), jnp.float32)
    values = jnp.zeros((2, 5), jnp.float32)
    keys = jax.random.split(jax.random.key(4), 8)
    base = lola.LolaConfig(gamma=0.6, horizon=40)
    with jax.enable_x64(True):
        exact = np.asarray(lola.exact_lola_gradients(thetas, base), np.float64)[0]
    corr = {}
    for size in (16, 1024):
        cfg = dataclasses.replace(base, comp=size, hessian=size, outer=size)
        grads = _sampled_meta_gradients(cfg, 0, thetas, values, keys)
        corr[size] = np.mean([np.corrcoef(g, exact)[0, 1] for g in grads])
    assert corr[1024] > 0.9, corr
    assert corr[1024] > corr[16] + 0.5, corr


def test_off_policy_weights_are_one_on_policy():
    thetas = jnp.asarray(_thetas(6), jnp.float32)
    values = jnp.asarray(np.random.default_rng(0).normal(-20, 5, 5), jnp.float32)
    episodes = ipd.sample(jax.random.key(0), thetas[0], thetas[1], 64)
    ratio = jnp.exp(ipd.joint_log_probs(thetas[0], thetas[1], episodes)
                    - episodes.log_probs.sum(-1))
    np.testing.assert_allclose(ratio, 1.0, atol=1e-5)

    def objective(t1, t2, off):
        return lola.dice_return(t1, t2, values, episodes, 0, 0.96, off)

    for order in (lambda f: f, jax.grad, lambda f: jax.grad(lambda a, b: jnp.sum(
            jax.grad(f, 1)(a, b) ** 2))):
        on, off = jax.jit(lambda a, b, order=order: (
            order(lambda x, y: objective(x, y, False))(a, b),
            order(lambda x, y: objective(x, y, True))(a, b)))(thetas[0], thetas[1])
        np.testing.assert_allclose(off, on, rtol=1e-4, atol=1e-4)


def test_off_policy_correction_reweights_stale_episodes():
    """Episodes from a behaviour policy, importance-weighted, estimate the target value (|z| < 4);
    read as on-policy they estimate the behaviour's value (rejected)."""
    behaviour = jnp.asarray(_thetas(7), jnp.float32)
    target = behaviour + 0.15 * jnp.asarray(_thetas(8), jnp.float32)
    episodes = ipd.sample(jax.random.key(1), behaviour[0], behaviour[1], 8192)
    zero = jnp.zeros(5, jnp.float32)

    def per_episode(off):
        one = jax.vmap(lambda e: lola.dice_return(
            target[0], target[1], zero, jax.tree.map(lambda x: x[None], e), 0, 0.96, off))
        return np.asarray(one(episodes), np.float64)

    with jax.enable_x64(True):
        truth = float(ipd.finite_horizon_values(jnp.asarray(target[0], jnp.float64),
                                                jnp.asarray(target[1], jnp.float64))[0])
    for off, accepted in ((True, True), (False, False)):
        x = per_episode(off)
        z = (x.mean() - truth) / (x.std(ddof=1) / np.sqrt(len(x)))
        assert (abs(z) < 4) == accepted, (off, z)


def test_replay_ring_buffer_overwrites_oldest():
    cfg = lola.LolaConfig(comp_off_policy=True, hessian_off_policy=True, comp=2, hessian=2,
                          replay_size=4, horizon=3)
    replay = lola.replay_fill(jax.random.key(0), jnp.zeros(5), jnp.zeros(5), cfg)
    fresh = jax.tree.map(lambda x: jnp.full((2,) + x.shape[1:], 7, x.dtype), replay.episodes)
    replay = lola.replay_add(replay, fresh)
    assert int(replay.next) == 2
    assert np.all(np.asarray(replay.episodes.rewards[:2]) == 7)
    replay = lola.replay_add(lola.replay_add(replay, fresh), fresh)
    assert int(replay.next) == 2 and np.all(np.asarray(replay.episodes.rewards) == 7)


def test_training_is_deterministic_per_seed_and_chunk_invariant():
    cfg = lola.LolaConfig(comp=8, hessian=8, outer=8, horizon=12)
    a = lola.train(cfg, seed=3, num_seeds=3, num_updates=4, chunk=2).metrics
    again = lola.train(cfg, seed=3, num_seeds=3, num_updates=4, chunk=2)
    b = lola.train(cfg, seed=3, num_seeds=2, num_updates=4, chunk=4).metrics
    assert again.compile_seconds < 0.5  # the compiled program is reused
    for x, y, z in zip(a, again.metrics, b, strict=True):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x[:2], z)
    assert not np.array_equal(a.grad[0], a.grad[1])  # seeds differ
    assert a.score.shape == (3, 4, 2) and a.cooperation.shape == (3, 4, 2, 5)


_TWO_DEVICE_RUN = """
import sys
import numpy as np
import jax
from gmrl.devices import use_cpu_devices
assert use_cpu_devices(2) == 2  # once, before any JAX computation
from gmrl.algos import lola
assert len(jax.devices()) == 2
cfg = lola.LolaConfig(comp=8, hessian=8, outer=8, horizon=12)
metrics = lola.train(cfg, seed=3, num_seeds=2, num_updates=4, chunk=4).metrics
np.savez(sys.argv[1], *metrics)
"""


def test_seeds_sharded_over_two_cpu_devices_give_the_same_results(tmp_path):
    """`gmrl lola` splits seeds over 2 CPU devices (in a fresh process: JAX fixes the device
    count per process, `gmrl.devices.use_cpu_devices`); the sharded run matches the
    single-device one."""
    path = tmp_path / "two_devices.npz"
    subprocess.run([sys.executable, "-c", _TWO_DEVICE_RUN, str(path)], check=True, timeout=300)
    sharded = np.load(path)
    cfg = lola.LolaConfig(comp=8, hessian=8, outer=8, horizon=12)
    single = lola.train(cfg, seed=3, num_seeds=2, num_updates=4, chunk=4).metrics  # as above
    for i, x in enumerate(single):
        np.testing.assert_allclose(sharded[f"arr_{i}"], x, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_off_policy_training_is_deterministic_and_finite():
    """Slow (compiles the replay variant); the fast tests cover the replay and the weights."""
    cfg = lola.LolaConfig(comp=8, hessian=16, outer=8, horizon=12, comp_off_policy=True,
                          replay_size=16, replay_mode="persistent")
    a = lola.train(cfg, seed=1, num_seeds=2, num_updates=3, chunk=3).metrics
    b = lola.train(cfg, seed=1, num_seeds=2, num_updates=3, chunk=3).metrics
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
        assert np.all(np.isfinite(x))


def test_exact_lola_reaches_mutual_cooperation():
    cfg = lola.LolaConfig(comp=None, hessian=None, outer=None)
    metrics = lola.train(cfg, seed=0, num_seeds=1, num_updates=200, chunk=100).metrics
    assert metrics.score[0, -1].mean() > -1.1
    np.testing.assert_allclose(metrics.grad, metrics.exact_grad, rtol=1e-4, atol=1e-4)
    assert np.all(lola.correlations(metrics) > 0.9999)


def test_config_validation():
    with pytest.raises(InputError, match="off-policy comp needs a batch size"):
        lola.LolaConfig(comp=None, comp_off_policy=True).validate()
    with pytest.raises(InputError, match="multiple"):
        lola.LolaConfig(comp=100, comp_off_policy=True).validate()
    with pytest.raises(InputError, match="exact"):
        lola_runs.parse_source("many", "--inner")
    assert lola_runs.parse_source("exact", "--inner") is None
    for name, overrides in lola.REFERENCE_VARIANTS.items():
        assert dataclasses.replace(lola.LolaConfig(), **overrides).validate(), name


def test_cli_bad_input_exits_2(capsys):
    for argv in (["lola", "--inner", "-3"], ["lola", "--outer", "exact", "--off-policy",
                                              "--inner", "exact"],
                 ["study", "lola", "--variants", "nope"]):
        with pytest.raises(SystemExit) as err:
            gmrl_cli.main(argv)
        assert err.value.code == 2
        assert capsys.readouterr().err.startswith("gmrl: error:")


def test_cli_lola_writes_results(tmp_path):
    out = tmp_path / "run"
    gmrl_cli.main(["lola", "--inner", "exact", "--outer", "exact", "--seeds", "2", "--updates",
                   "3", "--horizon", "10", "--out", str(out), "--cpu-devices", "1"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == 2 and summary["updates"] == 3
    assert summary["mean_corr"] > 0.9999
    assert (out / "per_seed.csv").read_text().count("\n") == 1 + 2 * 3
    assert (out / "curves.csv").exists() and (out / "config.json").exists()


def test_report_and_figures_from_summaries(tmp_path):
    def fake(corr):
        per_seed = list(corr + 0.01 * np.arange(-2, 3))
        return {"final_joint_score": -1.2, "final_joint_score_hw": 0.1, "mean_corr": corr,
                "mean_corr_hw": 0.01, "run_seconds": 1.0, "compile_seconds": 1.0,
                "per_seed_mean_corr": per_seed,
                "curves": {"joint_score": [-1.5, -1.2], "joint_score_hw": [0.0, 0.1],
                           "corr": [corr, corr], "corr_hw": [0.01, 0.01]}}

    summaries = {"inner128-outer128": fake(0.2), "off-policy": fake(0.5),
                 "comp1024-hess128": fake(0.2)}
    lola_runs.plot_curves(tmp_path, summaries)
    lola_runs.write_report(tmp_path / "report.md", summaries, 5, 2)
    report = (tmp_path / "report.md").read_text()
    assert "(off-policy) raises the gradient correlation" in report
    assert "(comp1024-hess128) does not significantly change" in report
    assert (tmp_path / "joint_score.png").stat().st_size > 0
    assert (tmp_path / "correlation.png").stat().st_size > 0


def _numbers(result):
    """A stored LOLA result without its timings."""
    return json.dumps({k: v for k, v in result.items()
                       if k not in ("compile_seconds", "run_seconds")}, sort_keys=True)


STUDY_VARIANTS = ("inner-exact-outer-exact", "inner-exact")


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_lola_study_on_ray_gives_the_same_numbers_as_local(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    import shutil
    import tempfile

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    points = lola_runs.study_points(list(STUDY_VARIANTS), seeds=2, updates=3, seed=1)
    local = lola_runs.run(points, tmp_path / "local", chunk=3, progress=False)
    temp_dir = tempfile.mkdtemp(prefix="gmrlray", dir="/tmp")
    try:
        remote = lola_runs.run(points, tmp_path / "ray", chunk=3, backend="ray", progress=False,
                               ray_init_kwargs={"num_cpus": 2, "_temp_dir": temp_dir})
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert [_numbers(r) for r in remote] == [_numbers(r) for r in local]
    again = lola_runs.run(points, tmp_path / "local", chunk=1, progress=False)  # from the store
    assert [_numbers(r) for r in again] == [_numbers(r) for r in local]


def _stored_rows(path):
    import sqlite3

    try:
        with sqlite3.connect(path, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.parametrize("sig", ["SIGINT", pytest.param("SIGKILL", marks=pytest.mark.slow)])
def test_interrupted_lola_study_resumes_from_the_store_to_the_same_numbers(tmp_path, sig):
    import signal
    import time
    from pathlib import Path

    from gmrl.store import ResultStore

    gmrl = Path(sys.executable).parent / "gmrl"
    argv = [str(gmrl), "study", "lola", "--variants", ",".join(STUDY_VARIANTS), "--seeds", "2",
            "--updates", "3", "--chunk", "3", "--cpu-devices", "1", "--no-progress"]
    out = tmp_path / "study"
    process = subprocess.Popen(argv + ["--out", str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while _stored_rows(out / "results.sqlite") < 1:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(getattr(signal, sig))
    _, err = process.communicate(timeout=120)
    if sig == "SIGINT":
        assert process.returncode == 130 and "re-run the same command to resume" in err, err
    if _stored_rows(out / "results.sqlite") == len(STUDY_VARIANTS):
        pytest.skip("the second variant finished before the signal arrived")
    done = subprocess.run(argv + ["--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    points = lola_runs.study_points(list(STUDY_VARIANTS), seeds=2, updates=3, seed=0)
    whole = lola_runs.run(points, tmp_path / "whole", chunk=3, progress=False)
    with ResultStore(out / "results.sqlite") as store:
        assert len(store) == len(STUDY_VARIANTS)
        resumed = [store.get(lola_runs_key(p)).result for p in points]
    assert [_numbers(r) for r in resumed] == [_numbers(r) for r in whole]
    assert (out / "report.md").exists() and (out / "correlation.png").exists()


def lola_runs_key(point):
    from gmrl.store import config_key

    return config_key(point)


def test_cli_replay_modes_match_the_library():
    from gmrl.commands import lola as command

    assert command.REPLAY_MODES == lola.REPLAY_MODES
