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
from gmrl import io
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
                                    jax.random.split(jax.random.key(3), 64))
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
    fast test: the median per-estimate correlation with the exact gradient rises from below 0.5
    to above 0.85 (the median: single DiCE LOLA estimates are heavy-tailed, a few point away
    even at 1024 episodes)."""
    thetas = jnp.asarray(_thetas(5), jnp.float32)
    values = jnp.zeros((2, 5), jnp.float32)
    keys = jax.random.split(jax.random.key(4), 16)
    base = lola.LolaConfig(gamma=0.6, horizon=40)
    with jax.enable_x64(True):
        exact = np.asarray(lola.exact_lola_gradients(thetas, base), np.float64)[0]
    corr = {}
    for size in (16, 1024):
        cfg = dataclasses.replace(base, comp=size, hessian=size, outer=size)
        grads = _sampled_meta_gradients(cfg, 0, thetas, values, keys)
        corr[size] = np.median([np.corrcoef(g, exact)[0, 1] for g in grads])
    assert corr[1024] > 0.85, corr
    assert corr[1024] > corr[16] + 0.4, corr


def test_off_policy_weights_are_one_on_policy():
    thetas = jnp.asarray(_thetas(6), jnp.float32)
    values = jnp.asarray(np.random.default_rng(0).normal(-20, 5, 5), jnp.float32)
    episodes, behaviour = lola.sample_with_behaviour(jax.random.key(0), thetas[0], thetas[1], 64,
                                                     ipd.HORIZON)
    ratio = jnp.exp(ipd.joint_log_probs(thetas[0], thetas[1], episodes) - behaviour)
    np.testing.assert_allclose(ratio, 1.0, atol=1e-5)

    def objective(t1, t2, off):
        return lola.dice_return(t1, t2, values, episodes, 0, 0.96, behaviour if off else None)

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
    episodes, log_mu = lola.sample_with_behaviour(jax.random.key(1), behaviour[0], behaviour[1],
                                                  8192, ipd.HORIZON)
    zero = jnp.zeros(5, jnp.float32)

    def per_episode(off):
        def one(e, mu):
            e = jax.tree.map(lambda x: x[:, None], e)
            return lola.dice_return(target[0], target[1], zero, e, 0, 0.96,
                                    mu[:, None] if off else None)
        return np.asarray(jax.vmap(one, (1, 1))(episodes, log_mu), np.float64)

    with jax.enable_x64(True):
        truth = float(ipd.finite_horizon_values(jnp.asarray(target[0], jnp.float64),
                                                jnp.asarray(target[1], jnp.float64))[0])
    for off, accepted in ((True, True), (False, False)):
        x = per_episode(off)
        z = (x.mean() - truth) / (x.std(ddof=1) / np.sqrt(len(x)))
        assert (abs(z) < 4) == accepted, (off, z)


# A stale replay: 192 of its 256 episodes come from older policies, 64 fresh ones are added by
# the lookahead. γ = 0.6 and T = 40 (γ^T ≈ 1e-9): the infinite-game oracle is the truth.
STALE = lola.LolaConfig(comp=None, hessian=64, outer=None, hessian_off_policy=True,
                        replay_size=256, gamma=0.6, horizon=40)
STALE_REPEATS = 600


def _stale_estimates(drop_weights: bool):
    """Per repeat (a fresh stale replay and fresh batch each): player 1's inner gradient of the
    opponent's return from the replay, and its LOLA meta-gradient (step value and outer part
    exact, Hessian part from the replay): [R, 5] each, with the exact values. `drop_weights`:
    the uncorrected control (`LolaConfig.replay_weights=False`)."""
    cfg = dataclasses.replace(STALE, replay_weights=not drop_weights)
    thetas = jnp.asarray(_thetas(11, 0.6), jnp.float32)
    older = thetas + 0.5 * jnp.asarray(_thetas(12), jnp.float32)
    values = jnp.asarray(np.random.default_rng(13).normal(-2, 1, (2, 5)), jnp.float32)

    def one(key):
        key_fill, key_step = jax.random.split(key)
        replay = lola.replay_fill(key_fill, older[0], older[1], cfg)
        inner = lola._opponent_gradient(cfg.hessian, True, 0, thetas[0], thetas[1], values[1],
                                        jax.random.split(key_step)[0], replay, cfg)[0]
        meta = jax.grad(lambda t: lola.meta_objective(t, 0, thetas[1], values, key_step, replay,
                                                      cfg)[0])(thetas[0])
        return inner, meta

    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(14), STALE_REPEATS)
        inner, meta = (np.asarray(x, np.float64) for x in jax.jit(jax.vmap(one))(keys))
        t64 = thetas.astype(jnp.float64)
        exact_inner = np.asarray(jax.grad(lambda t: ipd.exact_values(t64[0], t, 0.6)[1])(t64[1]))
        exact_meta = np.asarray(lola.exact_lola_gradients(thetas, cfg), np.float64)[0]
    return (inner, exact_inner), (meta, exact_meta)


def _z(estimates, truth):
    return (estimates.mean(0) - truth) / (estimates.std(0, ddof=1) / np.sqrt(len(estimates)))


def test_stale_replay_gradients_are_unbiased_with_weights_and_biased_without():
    """The lookahead's off-policy DiCE over a persistent replay of older episodes: its inner
    gradient and the LOLA meta-gradient it yields (Hessian part from the replay, the rest exact:
    a linear composition, so no compositional bias) are unbiased for the exact values at the
    current parameters (every |z| < 4, 5 coordinates each); with the importance weights
    dropped, both are rejected (some |z| > 6)."""
    for part in _stale_estimates(drop_weights=False):
        assert np.all(np.abs(_z(*part)) < 4), _z(*part)
    for part in _stale_estimates(drop_weights=True):
        assert np.max(np.abs(_z(*part))) > 6, _z(*part)


def test_uncorrected_replay_equals_corrected_when_the_replay_is_on_policy():
    """A replay filled at the current policies (and the lookahead's fresh batch, drawn there too):
    every weight is 1 in value, so dropping the weights (`replay_weights=False`) changes neither
    the inner gradient nor the LOLA meta-gradient, draw for draw. Mutation caught: the
    uncorrected path also dropping the value baseline."""
    cfg = lola.LolaConfig(comp=64, hessian=64, outer=None, comp_off_policy=True,
                          hessian_off_policy=True, replay_size=256, gamma=0.6, horizon=40)
    thetas = jnp.asarray(_thetas(21, 0.6), jnp.float32)
    values = jnp.asarray(np.random.default_rng(22).normal(-2, 1, (2, 5)), jnp.float32)

    def meta(key, weights):
        c = dataclasses.replace(cfg, replay_weights=weights)
        replay = lola.replay_fill(jax.random.split(key)[0], thetas[0], thetas[1], c)
        return jax.grad(lambda t: lola.meta_objective(t, 0, thetas[1], values, key, replay,
                                                      c)[0])(thetas[0])

    keys = jax.random.split(jax.random.key(23), 4)
    with jax.enable_x64(True):  # the exact outer part is float64
        corrected, uncorrected = (np.asarray(jax.jit(jax.vmap(lambda k, w=w: meta(k, w)))(keys))
                                  for w in (True, False))
    np.testing.assert_allclose(uncorrected, corrected, rtol=1e-4, atol=1e-4)
    assert np.all(np.std(corrected, 0) > 1e-3)  # the draws differ: the check is not vacuous


def test_independent_batches_differ_draw_by_draw_and_are_unbiased_for_the_decoupled_step():
    """128/128 with `independent_inner`: the step's value and Jacobian from independent batches.
    Draw by draw it differs from the shared-batch estimate (same keys); in expectation it equals
    the estimate with the same compositional batch and the exact Hessian part (the Jacobian
    estimate is unbiased and independent of the value), |z| < 4 on the paired difference (outer
    exact, γ = 0.6, T = 40). The shared batch need not: its value and Jacobian are correlated.
    Mutation caught: `independent_inner` ignored (one shared batch)."""
    base = lola.LolaConfig(comp=64, hessian=64, outer=None, gamma=0.6, horizon=40)
    thetas = jnp.asarray(_thetas(31, 0.6), jnp.float32)
    values = jnp.asarray(np.random.default_rng(32).normal(-2, 1, (2, 5)), jnp.float32)
    keys = jax.random.split(jax.random.key(33), 400)
    draws = {}
    for name, cfg in (("shared", base),
                      ("independent", dataclasses.replace(base, independent_inner=True)),
                      ("hessian-exact", dataclasses.replace(base, hessian=None))):
        draws[name] = _sampled_meta_gradients(cfg, 0, thetas, values, keys)
    gap = np.max(np.abs(draws["independent"] - draws["shared"]), -1)
    assert np.all(gap > 1e-4), gap.min()
    z = _z(draws["independent"] - draws["hessian-exact"], 0.0)
    assert np.all(np.abs(z) < 4), z


def test_replay_is_a_fifo_of_fixed_capacity():
    cfg = lola.LolaConfig(comp_off_policy=True, hessian_off_policy=True, comp=2, hessian=2,
                          replay_size=6, horizon=3)
    replay = lola.replay_fill(jax.random.key(0), jnp.zeros(5), jnp.zeros(5), cfg)
    assert replay.behaviour.shape == (3, 6) and replay.episodes.states.shape == (3, 6)

    def marked(value):
        fresh = jax.tree.map(lambda x: jnp.full((3, 2), value, x.dtype), replay.episodes)
        return fresh, jnp.full((3, 2), -float(value))

    slots = []
    for value in (1, 2, 3, 4):
        replay = lola.replay_add(replay, *marked(value))
        slots.append(int(replay.next))
        assert replay.behaviour.shape == (3, 6)  # capacity fixed
    assert slots == [2, 4, 0, 2]
    # after 4 additions of 2 into 6 slots: batch 4 overwrote the oldest (batch 1), order kept
    np.testing.assert_array_equal(np.asarray(replay.episodes.outcomes[0]), [4, 4, 2, 2, 3, 3])
    np.testing.assert_array_equal(np.asarray(replay.behaviour[0]), [-4, -4, -2, -2, -3, -3])


def test_weight_statistics_match_a_direct_computation():
    rng = np.random.default_rng(3)
    log_prob = rng.normal(-1.0, 0.3, (7, 50))
    behaviour = log_prob + rng.normal(0.0, 0.2, (7, 50))
    stats = lola.weight_stats(jnp.asarray(log_prob), jnp.asarray(behaviour))
    w = np.exp(np.cumsum(log_prob - behaviour, axis=0))  # per-decision weights [T, N]
    ess = (w.sum(1) ** 2 / (w ** 2).sum(1)).mean()
    np.testing.assert_allclose(float(stats.ess), ess, rtol=1e-5)
    np.testing.assert_allclose(float(stats.max_log_weight), np.log(w).max(), rtol=1e-5)
    equal = lola.weight_stats(jnp.asarray(log_prob), jnp.asarray(log_prob))
    np.testing.assert_allclose(float(equal.ess), 50.0, rtol=1e-6)


def test_clip_rho_truncates_every_per_decision_ratio_in_value():
    thetas = jnp.asarray(_thetas(15), jnp.float32)
    older = thetas + 0.8 * jnp.asarray(_thetas(16), jnp.float32)
    episodes, mu = lola.sample_with_behaviour(jax.random.key(2), older[0], older[1], 64, 20)
    zero = jnp.zeros(5, jnp.float32)
    log_rho = np.asarray(ipd.joint_log_probs(thetas[0], thetas[1], episodes) - mu, np.float64)
    rewards = np.asarray(episodes.rewards(0), np.float64)
    discounts = 0.9 ** np.arange(20)[:, None]
    for clip in (None, 1.0, 0.5):
        got = float(lola.dice_return(thetas[0], thetas[1], zero, episodes, 0, 0.9, mu, clip))
        ratio = np.exp(log_rho) if clip is None else np.minimum(np.exp(log_rho), clip)
        want = np.mean(np.sum(discounts * np.cumprod(ratio, 0) * rewards, 0))
        np.testing.assert_allclose(got, want, rtol=1e-4)
    assert not np.allclose(np.minimum(np.exp(log_rho), 0.5), np.exp(log_rho))  # clipping bites


def test_training_is_deterministic_per_seed_and_chunk_invariant():
    cfg = lola.LolaConfig(comp=8, hessian=8, outer=8, horizon=12)
    a = lola.train(cfg, seed=3, num_seeds=3, num_updates=4, chunk=2).metrics
    hits = lola._compiled_chunk.cache_info().hits
    again = lola.train(cfg, seed=3, num_seeds=3, num_updates=4, chunk=2)
    b = lola.train(cfg, seed=3, num_seeds=2, num_updates=4, chunk=4).metrics
    assert lola._compiled_chunk.cache_info().hits == hits + 1  # the compiled program is reused
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


def test_off_policy_training_is_deterministic_and_logs_a_stale_replay():
    cfg = lola.LolaConfig(comp=8, hessian=8, outer=8, horizon=12, comp_off_policy=True,
                          hessian_off_policy=True, replay_size=32)
    a = lola.train(cfg, seed=1, num_seeds=2, num_updates=6, chunk=3).metrics
    b = lola.train(cfg, seed=1, num_seeds=2, num_updates=6, chunk=3).metrics  # one program
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
        assert np.all(np.isfinite(x))
    # the replay is filled at θ = 0 and the policies move: after the first updates its
    # effective size falls below its 32 episodes (on-policy variants log NaN:
    # test_exact_lola_reaches_mutual_cooperation)
    assert np.all(a.ess[:, 0] > 31.99) and np.all(a.ess[:, 1:] < 31.99), a.ess


def test_exact_lola_reaches_mutual_cooperation():
    cfg = lola.LolaConfig(comp=None, hessian=None, outer=None)
    metrics = lola.train(cfg, seed=0, num_seeds=1, num_updates=200, chunk=100).metrics
    assert metrics.score[0, -1].mean() > -1.1
    assert np.all(np.isnan(metrics.ess)) and np.all(np.isnan(metrics.max_log_weight))
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


def _fake_result(final, corr, seeds=6, updates=20, ess=None):
    """A stored-result-like dict from per-seed final joint scores [S] and a correlation level."""
    rng = np.random.default_rng(int(1000 * abs(float(np.mean(final)) + corr)))
    score = np.broadcast_to(np.asarray(final)[:, None, None], (seeds, updates, 2)).copy()
    score[:, : updates // 2] = -1.8
    corrs = corr + 0.05 * rng.standard_normal((seeds, updates, 2))
    metrics = lola.UpdateMetrics(score, np.full((seeds, updates, 2, 5), 0.5),
                                 np.zeros((seeds, updates, 2, 5)), np.zeros((seeds, updates, 2, 5)),
                                 np.full((seeds, updates, 2), np.nan if ess is None else ess),
                                 np.full((seeds, updates, 2), np.nan if ess is None else 3.0))
    summary = lola_runs.summarize(metrics, corrs)
    summary.update(config={"replay_size": 1024, "comp_off_policy": ess is not None,
                           "hessian_off_policy": ess is not None, "horizon": 100},
                   run_seconds=1.0, compile_seconds=1.0,
                   per_seed={"score": score, "cooperation": metrics.cooperation, "corr": corrs,
                             "ess": metrics.ess, "max_log_weight": metrics.max_log_weight})
    return io.to_jsonable(summary)


def test_final_return_table_verdicts_and_figures(tmp_path):
    rng = np.random.default_rng(0)
    base = -1.5 + 0.02 * rng.standard_normal(6)
    results = {"inner128-outer128": _fake_result(base, 0.2),
               "off-policy": _fake_result(base + 0.45, 0.5, ess=300.0),
               "comp1024-hess128": _fake_result(base + 0.01 * rng.standard_normal(6), 0.2),
               "inner1024": _fake_result(base - 0.3, 0.4)}
    summaries = {n: {k: v for k, v in r.items() if k != "per_seed"} for n, r in results.items()}
    s = summaries["off-policy"]
    assert s["final_window"] == 2  # 10% of 20 updates
    np.testing.assert_allclose(s["per_seed_final_joint_score"], base + 0.45)
    assert s["mutual_cooperation"] == 1.0 and summaries["inner1024"]["mutual_cooperation"] == 0.0
    assert s["replay_ess"] == 300.0
    tests = lola_runs.final_return_tests(summaries)
    assert set(tests) == {"off-policy", "comp1024-hess128", "inner1024"}
    for t in tests.values():  # Holm never lowers a p-value, and here it scales the smallest by 3
        assert t["p_holm"] >= t["p"]
    smallest = min(tests, key=lambda n: tests[n]["p"])
    assert tests[smallest]["p_holm"] == pytest.approx(min(1.0, 3 * tests[smallest]["p"]))
    lola_runs.plot_study(tmp_path, results)
    lola_runs.write_report(tmp_path / "report.md", summaries, 6, 20)
    report = (tmp_path / "report.md").read_text()
    assert "(off-policy): **raises the final return**" in report
    assert "(inner1024): **lowers the final return**" in report
    assert "(comp1024-hess128): **no significant change**" in report
    assert "detects with 80% power" in report and "`--seeds` is the lever" in report
    assert "Off-policy variants against inner1024" in report
    for name in ("joint_score.png", "correlation.png", "final_joint_score.png", "replay_ess.png"):
        assert (tmp_path / name).stat().st_size > 0
    # the controls: their own Holm family (the reference p-values do not move), one verdict line
    # per controlled comparison with its permutation p and cooperation shares
    results.update({"off-policy-unweighted": _fake_result(base + 0.44, 0.5, ess=300.0),
                    "inner128-independent": _fake_result(base + 0.5, 0.2)})
    summaries = {n: {k: v for k, v in r.items() if k != "per_seed"} for n, r in results.items()}
    with_controls = lola_runs.final_return_tests(summaries)
    for name, t in tests.items():
        assert with_controls[name]["p_holm"] == pytest.approx(t["p_holm"]), name
    errors = {n: {"at": [0, 25], "draws": 4, "bias2": [0.1, 0.0], "bias2_se": [0.1, 0.01],
                  "variance": [2.0, 0.1], "exact_sq": [3.0, 0.2], "replay_ess": [np.nan, np.nan]}
              for n in results}
    lola_runs.write_report(tmp_path / "report.md", summaries, 6, 20, errors)
    report = (tmp_path / "report.md").read_text()
    assert "(off-policy vs off-policy-unweighted): **no significant change**" in report
    assert "(inner128-independent vs inner128-outer128): **raises the final return**" in report
    assert "(comp1024-hess128 vs inner128-independent): **lowers the final return**" in report
    assert report.count("permutation p =") == 4
    assert "## Gradient error at fixed points" in report and "| inner1024 | 0.1 ± 0.1 | 2 |" in report


def test_exact_diagnostic_outside_the_update_matches_the_oracle():
    cfg = lola.LolaConfig(comp=8, hessian=8, outer=8, horizon=12)
    metrics = lola.train(cfg, seed=2, num_seeds=2, num_updates=3, chunk=3).metrics
    thetas = np.log(metrics.cooperation / (1 - metrics.cooperation))
    with jax.enable_x64(True):
        for s in range(2):
            for u in range(3):
                want = lola.exact_lola_gradients(jnp.asarray(thetas[s, u], jnp.float32), cfg)
                np.testing.assert_allclose(metrics.exact_grad[s, u], want, rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(metrics.score[s, u], lola.exact_average_rewards(
                    jnp.asarray(thetas[s, u], jnp.float32), 12), rtol=1e-5)


def _numbers(result):
    """A stored LOLA result without its timings."""
    return json.dumps({k: v for k, v in result.items()
                       if k not in ("compile_seconds", "run_seconds")}, sort_keys=True)


STUDY_VARIANTS = ("inner-exact-outer-exact", "inner-exact")


@pytest.mark.xdist_group("ray")  # one local Ray at a time under pytest -n
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
    # the programs compile before any run trains, so the second (sampled) variant gets enough
    # updates to be still training when the signal arrives
    argv = [str(gmrl), "study", "lola", "--variants", ",".join(STUDY_VARIANTS), "--seeds", "2",
            "--updates", "1000", "--chunk", "100", "--cpu-devices", "1", "--no-progress",
            "--error-draws", "0"]
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
    if _stored_rows(out / "results.sqlite") == len(STUDY_VARIANTS):
        pytest.skip("the second variant finished before the signal arrived")
    if sig == "SIGINT":
        assert process.returncode == 130 and "re-run the same command to resume" in err, err
    done = subprocess.run(argv + ["--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    points = lola_runs.study_points(list(STUDY_VARIANTS), seeds=2, updates=1000, seed=0)
    whole = lola_runs.run(points, tmp_path / "whole", chunk=100, progress=False)
    with ResultStore(out / "results.sqlite") as store:
        assert len(store) == len(STUDY_VARIANTS)
        resumed = [store.get(lola_runs_key(p)).result for p in points]
    assert [_numbers(r) for r in resumed] == [_numbers(r) for r in whole]
    assert (out / "report.md").exists() and (out / "final_joint_score.png").exists()


def lola_runs_key(point):
    from gmrl.store import config_key

    return config_key(point)


def test_cli_baselines_match_the_library():
    from gmrl.commands import lola as command

    assert command.BASELINES == lola.BASELINES


def test_permutation_test_is_exact_when_small_and_monte_carlo_agrees():
    """Exact enumeration: of the 20 relabellings of (1, 2, 3 | 4, 5, 6) two are as extreme as the
    observed split, p = 0.1; the Monte Carlo path agrees with the exact p (8 + 8 seeds, 12870
    relabellings) within 4 Monte Carlo se. Mutation caught: a one-sided count (no |·|)."""
    assert lola_runs.permutation_p([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)
    assert lola_runs.permutation_p([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 8), rng.normal(0.8, 1, 8)
    exact = lola_runs.permutation_p(a, b)
    sampled = lola_runs.permutation_p(a, b, permutations=4000, seed=1)
    assert 0.001 < exact < 0.5
    assert abs(sampled - exact) < 4 * np.sqrt(exact * (1 - exact) / 4000), (sampled, exact)


def test_reference_points_keep_their_keys_and_controls_round_trip():
    """The control switches at their defaults stay out of a point's config, so the reference
    variants' points (and store keys) are those from before the switches; every study variant's
    config round-trips through the point."""
    for name, overrides in lola.STUDY_VARIANTS.items():
        cfg = lola.LolaConfig(**overrides)
        fields = lola_runs.config_dict(cfg)
        assert lola_runs.lola_config(fields) == cfg, name
        switched = bool(set(lola_runs.CONTROL_DEFAULTS) & set(fields))
        assert switched == (name in ("off-policy-unweighted", "stale32-unweighted",
                                     "inner128-independent")), name
    with pytest.raises(InputError, match="only to an off-policy"):
        lola.LolaConfig(replay_weights=False).validate()
    with pytest.raises(InputError, match="clip-rho"):
        lola.LolaConfig(comp_off_policy=True, replay_weights=False, clip_rho=1.0).validate()


def test_gradient_error_draws_are_the_update_at_the_exact_runs_parameters():
    """The exact run's first Adam step is lr·sign(g) from zero logits; each draw's estimate at a
    point is `update`'s meta-gradient at the exact run's logits there (same key, values still 0
    with an exact outer part); exact LOLA has zero bias² and variance."""
    cfg = lola.LolaConfig(comp=16, hessian=16, outer=None, gamma=0.6, horizon=20)
    traj = np.asarray(lola.exact_trajectory(cfg, 3))
    with jax.enable_x64(True):
        g0 = np.asarray(lola.exact_lola_gradients(jnp.zeros((2, 5)), cfg))
    np.testing.assert_allclose(traj[0], 0.0)
    np.testing.assert_allclose(traj[1], cfg.outer_lr * np.sign(g0), rtol=1e-4, atol=1e-6)
    error = lola.gradient_error(cfg, at=(0, 2), draws=3, seed=5)
    key_init, key_run = jax.random.split(jax.random.split(jax.random.key(5), 3)[1])
    with jax.enable_x64(True):
        state = lola.init_state(key_init, cfg)._replace(thetas=jnp.asarray(traj[2]))
        direct = lola.update(state, jax.random.fold_in(key_run, 2), cfg)[1].grad
    np.testing.assert_allclose(error.estimates[1, 1], np.asarray(direct), rtol=1e-4, atol=1e-5)
    exact = lola.error_summary(lola.gradient_error(
        dataclasses.replace(cfg, comp=None, hessian=None), at=(0, 2), draws=3))
    np.testing.assert_allclose(exact["variance"], 0.0, atol=1e-12)
    np.testing.assert_allclose(exact["bias2"], 0.0, atol=1e-10)
