"""gmrl check --game ipd / gmrl.check_lola (issue 11, item 4): real LOLA clients get their labels.

CI scale: T = 10, γ = 0.9 (the defaults are T = 20, γ = 0.96), 4 parameter points × 40 repeats,
look-ahead step α = 1 (the default); the candidates' expectations are computed once per process
for these settings and shared by every client with 128-episode look-ahead batches (and the CLI
test).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gmrl
from gmrl.algos import lola as lola_algo
from gmrl.check import lola
from gmrl.check.task import Recorder
from gmrl.cli import main
from gmrl.envs import ipd

from .check_clients import jax_lola

torch_lola = pytest.importorskip("tests.check_clients.torch_lola")

CLIENTS = Path(__file__).parent / "check_clients"
GMRL = str(Path(sys.executable).parent / "gmrl")
SMALL = dict(points=4, repeats=40, horizon=10, gamma=0.9)


@pytest.mark.parametrize("name, label", [
    ("lola_dice", "second-order-unbiased"),
    ("lola_first_order", "first-order"),
    ("naive", "naive"),
    ("lola_dice_halved", "scaled"),
])
def test_torch_lola_clients_get_their_label(name, label):
    result = gmrl.check_lola(getattr(torch_lola, name), progress=False, **SMALL)
    assert result.label == label, result.diagnosis.message
    assert result.config["path"] == "python" and result.config["game"] == "ipd"
    assert result.estimates.shape == (4, 40, 2, 5) and result.exact.shape == (4, 2, 5)
    if name == "naive":
        assert result.calls == [[128]] and result.config["structure"]["shared"]
    else:
        assert result.calls == [[128, 128], [128], [128]]
        assert result.config["structure"] == {"lookahead_sizes": [128, 128], "shared": False}
    if label == "scaled":
        low, high = result.diagnosis.best.scale_ci
        assert low < 0.5 < high < 1, result.diagnosis.message
        assert result.diagnosis.best.label == "second-order-unbiased"
    else:
        assert result.diagnosis.best.label == label
    assert all(t.rejected for t in result.diagnosis.rejected)
    assert {t.label for t in result.diagnosis.rejected} >= {"second-order-unbiased", "first-order",
                                                            "naive"} - {label}


def test_jax_lola_client_is_vmapped_and_gets_its_label():
    result = gmrl.check_lola(jax_lola.lola_dice, progress=False, **SMALL)
    assert result.config["path"] == "jax"
    assert result.label == "second-order-unbiased", result.diagnosis.message
    # one look-ahead batch shared by both players, then each player's outer batch
    assert result.calls == [[128], [128], [128]] and result.config["structure"]["shared"]


def test_exact_lola_gradient():
    """The finite-horizon exact gradient tends to gmrl.algos.lola's infinite-game one as T grows;
    player 2's is player 1's at the swapped point; α → 0 gives the naive gradient."""
    with jax.enable_x64(True):
        thetas = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5)))
        cfg = lola_algo.LolaConfig(inner_lr=0.7, gamma=0.8)
        infinite = np.asarray(lola_algo.exact_lola_gradients(thetas, cfg))
        exact = jax.jit(lola.exact_lola, static_argnums=(2, 3))
        long = np.asarray(exact(thetas, 0.8, 0.7, 400))
        np.testing.assert_allclose(long, infinite, rtol=1e-9, atol=1e-12)
        short = np.asarray(exact(thetas, 0.8, 0.7, 10))
        assert np.abs(short - infinite).max() > 1e-2
        swapped = np.asarray(exact(thetas[::-1], 0.8, 0.7, 10))
        np.testing.assert_allclose(swapped[0], short[1], rtol=1e-12)
        naive = np.asarray(jax.jit(lola.naive_gradients, static_argnums=2)(thetas, 0.8, 10))
        tiny = np.asarray(exact(thetas, 0.8, 1e-7, 10))
        np.testing.assert_allclose(tiny, naive, atol=1e-6)
        assert np.abs(short - naive).max() > 1e-2


def test_candidates_tend_to_exact_lola_and_first_order_with_many_episodes():
    """With large look-ahead batches the second-order candidate tends to the exact LOLA gradient,
    the first-order one to ∂_1 J_i(θ_i, θ_j + α∇_j J_j); both differ from the naive gradient."""
    with jax.enable_x64(True):
        points = jnp.asarray(np.random.default_rng(2).standard_normal((2, 2, 5)))
        gamma, lr, horizon = 0.9, 1.0, 5
        exact = np.asarray(jax.vmap(lambda t: lola.exact_lola(t, gamma, lr, horizon))(points))

        def first_order(t):
            def one(i):
                j = 1 - i
                look = t[j] + lr * jax.grad(lambda x: lola._values(
                    *lola._ordered(i, t[i], x), gamma, horizon)[j])(t[j])
                return jax.grad(lambda x: lola._values(*lola._ordered(i, x, look), gamma,
                                                       horizon)[i])(t[i])
            return jnp.stack([one(0), one(1)])

        fo = np.asarray(jax.vmap(first_order)(points))
        mean, var = lola.expectations(points, gamma, lr, horizon, (4096, 4096), 40, 0)
    sd = np.sqrt(var.max(-1, keepdims=True))
    names = [v.name for v in lola.VARIANTS]
    for index, target in ((0, exact), (1, exact), (2, fo), (3, fo)):
        np.testing.assert_allclose(mean[:, index], target.reshape(2, -1), atol=6 * sd.max() + 2e-3,
                                   err_msg=names[index])
    assert np.abs(fo - exact).max() > 0.05 and var[:, 4].max() < 1e-12  # naive: exact


def test_numpy_sampler_states_actions_rewards():
    rng = np.random.default_rng(0)
    theta1 = np.array([np.log(3.0), 0.0, 0.0, 0.0, -50.0])  # P(coop at start) = 3/4
    theta2 = np.array([-50.0, 0.0, 0.0, np.log(4.0), 0.0])   # defects at the start; P(coop | own DC) = 4/5
    ep = lola.sample_numpy(rng, theta1, theta2, 100_000, 3)
    assert ep.states.shape == ep.actions.shape == ep.rewards.shape == (100_000, 3, 2)
    assert np.all(ep.states[:, 0] == 0) and np.all(ep.actions[:, 0, 1] == 1)
    assert abs((ep.actions[:, 0, 0] == 0).mean() - 0.75) < 0.01
    # after C (p1) / D (p2): p1's own state is CD = 2, p2's is DC = 3; rewards −3 and 0
    coop = ep.actions[:, 0, 0] == 0
    assert np.all(ep.states[coop, 1, 0] == 2) and np.all(ep.states[coop, 1, 1] == 3)
    assert np.all(ep.rewards[coop, 0] == [-3.0, 0.0]) and np.all(ep.rewards[~coop, 0] == [-2.0, -2.0])
    assert abs((ep.actions[coop, 1, 1] == 0).mean() - 0.8) < 0.01  # p2 in its own state DC
    # after DD both are in state 4, where p1 always defects
    assert np.all(ep.states[~coop, 1] == 4) and np.all(ep.actions[~coop, 1, 0] == 1)


def test_numpy_and_jax_samplers_agree_in_distribution():
    thetas = np.random.default_rng(3).standard_normal((2, 5))
    numpy_ep = lola.sample_numpy(np.random.default_rng(0), thetas[0], thetas[1], 40_000, 4)
    with jax.enable_x64(True):
        game = lola.JaxGame(jnp.asarray(thetas[0]), jnp.asarray(thetas[1]), jnp.asarray(0.9), 1.0, 4,
                            Recorder())
        jax_ep = jax.tree.map(np.asarray, game.sample(game.theta1, game.theta2, 40_000,
                                                      jax.random.key(0)))
    for field in ("states", "actions", "rewards"):
        a, b = getattr(numpy_ep, field), getattr(jax_ep, field)
        assert a.shape == b.shape
        np.testing.assert_allclose(a.mean(0), b.mean(0), atol=0.04, err_msg=field)
    with jax.enable_x64(True):
        values = np.asarray(ipd.finite_horizon_values(jnp.asarray(thetas[0]), jnp.asarray(thetas[1]),
                                                      0.9, 4))
    discounted = (numpy_ep.rewards * 0.9 ** np.arange(4)[:, None]).sum(1).mean(0)
    np.testing.assert_allclose(discounted, values, atol=0.03)


def test_structure_from_calls():
    point = np.arange(10.0)
    rec = Recorder([128, 64, 128, 128], [point, point + 0, point + 1, point - 1])
    assert lola.structure_from_calls(rec, point)[:2] == ((128, 64), False)
    rec = Recorder([32, 32], [point, point + 1])
    assert lola.structure_from_calls(rec, point)[:2] == ((32, 32), True)
    sizes, shared, notes = lola.structure_from_calls(Recorder([16], [point + 1]), point)
    assert sizes == (16, 16) and notes


def _cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(["check", *args])
    return exit_info.value.code, capsys.readouterr()


def test_cli_game_ipd_writes_statistics_and_diagnosis(tmp_path, capsys):
    out = tmp_path / "lola.json"
    main(["check", f"{CLIENTS / 'torch_lola.py'}:lola_first_order", "--game", "ipd", "--points", "4",
          "--repeats", "40", "-T", "10", "--gamma", "0.9", "--no-progress", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "ipd LOLA" in printed and "diagnosis: first-order" in printed and "point" in printed
    data = json.loads(out.read_text())
    assert data["config"]["game"] == "ipd" and data["config"]["lr"] == 1.0
    assert np.asarray(data["config"]["thetas"]).shape == (4, 2, 5)
    assert data["diagnosis"]["label"] == "first-order"
    assert np.asarray(data["exact_meta_gradient"]).shape == (4, 2, 5)
    assert {"naive[no look-ahead]", "second-order-unbiased[dice, no baseline]"} <= set(data["candidates"])


@pytest.mark.parametrize("name, message", [
    ("raises", "your function raises raised KeyError: 'theta' (at bad_lola.py:7"),
    ("wrong_shape", "returned shape (5,); expected [2, 5] (both players' gradients) = (2, 5)"),
    ("returns_nan", "returned NaN or infinity"),
    ("zero_episodes", "game.sample(theta1, theta2, n, rng): n must be in [1, 1000000], got 0"),
    ("bad_theta", "theta1 must have shape (5,) (one logit per own state), got (2, 5)"),
    ("bad_rng", "rng must be the numpy.random.Generator gmrl passed to your function, got int"),
])
def test_bad_lola_functions_get_one_line_and_exit_2(tmp_path, capsys, name, message):
    out = tmp_path / "x.json"
    code, captured = _cli(capsys, f"{CLIENTS / 'bad_lola.py'}:{name}", "--game", "ipd",
                          "--points", "2", "--repeats", "3", "-T", "5", "--no-progress",
                          "--out", str(out))
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gmrl: error: "), captured.err
    assert message in lines[0]
    assert "Traceback" not in captured.err and not out.exists()


def test_cli_options_of_the_other_game_are_refused(capsys):
    code, captured = _cli(capsys, f"{CLIENTS / 'torch_lola.py'}:naive", "--game", "ipd", "--mdps", "3")
    assert code == 2 and "--mdps does not apply to --game ipd" in captured.err
    code, captured = _cli(capsys, f"{CLIENTS / 'torch_maml.py'}:maml_dice", "--points", "3")
    assert code == 2 and "--points does not apply to --game mdp" in captured.err
    code, captured = _cli(capsys, f"{CLIENTS / 'torch_lola.py'}:naive", "--game", "ipd",
                          "--thetas", "nope.npy")
    assert code == 2 and "--thetas must be normal, zeros or an existing .npy" in captured.err


@pytest.mark.slow
@pytest.mark.parametrize("name, label", [
    ("lola_dice", "second-order-unbiased"), ("lola_first_order", "first-order"),
    ("naive", "naive"), ("lola_dice_halved", "scaled")])
def test_lola_cli_defaults_within_two_minutes(tmp_path, name, label):
    """`gmrl check --game ipd` defaults (8 points × 50 repeats, T = 20, γ = 0.96, α = 1), a fresh
    process each, <= 2 minutes (the fast tests above cover the labels at CI scale)."""
    out = tmp_path / "lola.json"
    started = time.perf_counter()
    run = subprocess.run([GMRL, "check", f"{CLIENTS / 'torch_lola.py'}:{name}", "--game", "ipd",
                          "--no-progress", "--out", str(out)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - started
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    assert data["diagnosis"]["label"] == label, data["diagnosis"]["message"]
    assert seconds <= 120, seconds
