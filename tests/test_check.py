"""gmrl check (issue 11): real clients get their labels; bad clients get one line and exit 2."""

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
import gmrl.check
from gmrl import estimators as est
from gmrl import metagrad as mg
from gmrl.check import candidates as cand
from gmrl.check import diagnosis, task
from gmrl.cli import main
from gmrl.errors import InputError

from .check_clients import jax_lirpg, jax_maml

torch_maml = pytest.importorskip("tests.check_clients.torch_maml")

CLIENTS = Path(__file__).parent / "check_clients"
GMRL = str(Path(sys.executable).parent / "gmrl")
SMALL = dict(mdps=6, repeats=40, candidate_repeats=1000, progress=False, budget=600)
"""CI scale (the defaults are 10 MDPs × 50 repeats). The budget is wide so that the looks taken do
not depend on the machine's load (the correct DiCE client may need several). The candidates are
computed once per process for these settings and shared by every client with the same sampling
structure (and the CLI test). JAX clients run 100 repeats (1 ms an estimate): at 40, DiCE / 2 is
`scaled` with c's CI covering 0.5, but scaled LVC fits as well as scaled DiCE and can come out
best."""
JAX_REPEATS = 100


@pytest.mark.parametrize("module", [torch_maml, jax_maml], ids=["torch", "jax"])
@pytest.mark.parametrize("name, label", [
    ("maml_dice", "second-order-unbiased"),
    ("maml_dice_first_order", "first-order"),
    ("maml_logprob", "vanilla-logprob-hessian"),
    ("maml_dice_halved", "scaled"),
])
def test_real_clients_get_their_label(module, name, label):
    settings = SMALL | ({"repeats": JAX_REPEATS} if module is jax_maml else {})
    result = gmrl.check(getattr(module, name), **settings)
    assert result.label == label, result.diagnosis.message
    assert result.calls == [[64], [64]]
    assert result.config["path"] == ("jax" if module is jax_maml else "python")
    if label == "scaled":
        low, high = result.diagnosis.best.scale_ci
        assert low < 0.5 < high and high < 1, result.diagnosis.message
        assert result.diagnosis.best.label == "second-order-unbiased"
    else:
        assert result.diagnosis.best.label == label
    assert result.diagnosis.labels == (label,)  # decisive: the only consistent label
    assert all(t.rejected for t in result.diagnosis.rejected)
    looks = result.config["looks"]  # sequential by default: doubling repeats until decisive
    assert [k["repeats"] for k in looks] == [settings["repeats"] * 2**j for j in range(len(looks))]
    levels = [0.05 / (j * (j + 1)) for j in range(1, len(looks) + 1)]
    assert [k["level"] for k in looks] == pytest.approx(levels)
    assert all(k["label"] == "undetermined" for k in looks[:-1]) and looks[-1]["label"] == label
    assert result.estimates.shape[1] == result.config["repeats"] == looks[-1]["repeats"]


def test_one_look_names_no_wrong_label():
    """budget=0: one look at level α. The correct DiCE client at CI scale is either decisive and
    right or undetermined with its label among the consistent ones (never another label)."""
    result = gmrl.check(torch_maml.maml_dice, **(SMALL | {"budget": 0}))
    assert result.config["looks"] == [dict(result.config["looks"][0], look=1, repeats=40, level=0.05)]
    assert result.label in ("second-order-unbiased", "undetermined"), result.diagnosis.message
    assert "second-order-unbiased" in result.diagnosis.labels
    assert result.diagnosis.look is None and result.diagnosis.level == 0.05


@pytest.mark.parametrize("name, label", [("lirpg_dice", "second-order-unbiased"),
                                         ("lirpg_first_order", "first-order")])
def test_lirpg_clients(name, label):
    result = gmrl.check(getattr(jax_lirpg, name), problem="lirpg", mdps=4, repeats=30,
                        candidate_repeats=600, progress=False, budget=600)
    assert result.label == label, result.diagnosis.message
    if label == "first-order":
        assert np.all(result.estimates == 0)


@pytest.mark.slow
@pytest.mark.parametrize("name, label", [
    ("maml_dice", "second-order-unbiased"), ("maml_dice_first_order", "first-order"),
    ("maml_logprob", "vanilla-logprob-hessian"), ("maml_dice_halved", "scaled")])
def test_acceptance_torch_cli_defaults_within_two_minutes(tmp_path, name, label):
    """Issues 11 and 22 acceptance: `gmrl check` defaults (sequential, 2-minute budget), a fresh
    process each, a decisive label of its own in <= 2 minutes."""
    out = tmp_path / "check.json"
    started = time.perf_counter()
    run = subprocess.run([GMRL, "check",
                          f"{CLIENTS / 'torch_maml.py'}:{name}", "--no-progress", "--out", str(out)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - started
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    assert data["diagnosis"]["label"] == label, data["diagnosis"]["message"]
    assert data["diagnosis"]["labels"] == [label]
    if label == "scaled":
        low, high = data["diagnosis"]["best"]["scale_ci"]
        assert low < 0.5 < high
    assert seconds <= 120, seconds


def _cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(["check", *args])
    return exit_info.value.code, capsys.readouterr()


@pytest.mark.parametrize("name, message", [
    ("raises", "your function raises raised ZeroDivisionError: division by zero (at bad.py:7"),
    ("wrong_shape", "returned shape (100,); expected [S, A] = (20, 5)"),
    ("returns_nan", "returned NaN or infinity"),
    ("zero_episodes", "task.sample(theta, n, rng): n must be in [1, 1000000], got 0"),
    ("bad_theta", "theta must have shape (20, 5) [S, A], got (3,)"),
    ("bad_rng", "rng must be the numpy.random.Generator gmrl passed to your function, got int"),
    ("never_samples", "never called task.sample"),
    ("missing", "has no function 'missing'"),
])
def test_bad_user_functions_get_one_line_and_exit_2(tmp_path, capsys, name, message):
    out = tmp_path / "x.json"
    code, captured = _cli(capsys, f"{CLIENTS / 'bad.py'}:{name}", "--mdps", "2", "--repeats", "3",
                          "--no-progress", "--out", str(out))
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gmrl: error: "), captured.err
    assert message in lines[0]
    assert "Traceback" not in captured.err and not out.exists()


def test_jax_path_errors_are_one_line(capsys):
    code, captured = _cli(capsys, f"{CLIENTS / 'bad.py'}:bad_rng", "--jax", "--mdps", "2",
                          "--repeats", "3")
    assert code == 2 and "rng must be a JAX PRNG key" in captured.err
    code, captured = _cli(capsys, f"{CLIENTS / 'bad.py'}:not_traceable", "--jax", "--mdps", "2",
                          "--repeats", "3")
    assert code == 2 and "must be traceable" in captured.err and "bad.py:" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    code, captured = _cli(capsys, "nofile.py:f")
    assert code == 2 and "does not exist" in captured.err


def test_cli_budget_is_checked(capsys):
    code, captured = _cli(capsys, f"{CLIENTS / 'jax_maml.py'}:maml_dice", "--budget", "-1")
    assert code == 2 and "budget must be a number of seconds >= 0" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    code, captured = _cli(capsys, f"{CLIENTS / 'jax_lola.py'}:lola_dice", "--game", "ipd", "--budget", "5")
    assert code == 2 and "--budget does not apply to --game ipd" in captured.err


def test_cli_writes_statistics_and_diagnosis(tmp_path, capsys):
    out = tmp_path / "r.json"
    main(["check", f"{CLIENTS / 'jax_maml.py'}:maml_dice_first_order", "--mdps", "6",
          "--repeats", "40", "--budget", "0", "--no-progress", "--out", str(out)])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    label = data["diagnosis"]["label"]
    # one look at level 0.05: first-order, or undetermined with first-order among the labels (at
    # 40 repeats c·first-order[loaded] with c ≈ 0.8 can fit as well)
    assert f"diagnosis: {label}" in printed and "rejected" in printed
    assert label in ("first-order", "undetermined") and "first-order" in data["diagnosis"]["labels"]
    assert data["config"]["looks"][0]["level"] == 0.05 and len(data["config"]["looks"]) == 1
    assert data["config"]["path"] == "jax" and data["config"]["steps"] == 1
    assert {"candidate", "label", "distance", "p", "rejected"} <= set(data["diagnosis"]["rejected"][0])
    assert np.asarray(data["exact_meta_gradient"]).shape == (6, 20, 5)
    for key in ("bias2", "bias2_ci_low", "variance", "corr", "mse"):
        assert np.isfinite(data["summary"][key])


def test_numpy_sampler_follows_the_policy_and_the_transitions():
    rng = np.random.default_rng(0)
    P = np.array([[[0.2, 0.8], [1.0, 0.0]], [[0.5, 0.5], [0.0, 1.0]]])
    R = np.array([[1.0, 2.0], [3.0, 4.0]])
    theta = np.array([[0.0, np.log(3.0)], [0.0, 0.0]])
    ep = task.sample_numpy(rng, P, R, 0, theta, 200_000, 2)
    assert ep.states.shape == (200_000, 3) and ep.actions.shape == ep.rewards.shape == (200_000, 2)
    assert abs(ep.actions[:, 0].mean() - 0.75) < 0.005  # π(a=1|s=0) = 3/4
    # P(s1 = 1) = 1/4·0.8 + 3/4·0
    assert abs(ep.states[:, 1].mean() - 0.2) < 0.005
    np.testing.assert_array_equal(ep.rewards, R[ep.states[:, :-1], ep.actions])


def test_jax_sampler_matches_shapes_and_records_calls():
    with jax.enable_x64(True):
        rec = task.Recorder(probe=True)
        t = task.JaxTask(jnp.full((3, 2, 3), 1 / 3), jnp.ones((3, 2)), jnp.asarray(0.9),
                         jnp.asarray(0), 5, 1, 1.0, "maml", jnp.zeros((3, 2)), rec)
        ep = t.sample(t.phi, 7, jax.random.key(0))
        t.sample(t.phi, 9, jax.random.key(1))
        t.sample(t.phi + 1, 4, jax.random.key(2))
        jax.effects_barrier()
    assert ep.states.shape == (7, 6) and ep.actions.shape == (7, 5)
    assert rec.groups() == [[7, 9], [4]]


def test_structure_from_calls():
    s, notes = cand.structure_from_calls([[64], [64]], 1)
    assert s == cand.Structure((64,), (None,)) and not notes
    s, _ = cand.structure_from_calls([[32, 16], [8, 8], [64]], 2)
    assert s == cand.Structure((32, 8), (16, 8))
    s, notes = cand.structure_from_calls([[64]], 1)
    assert notes and s.value_sizes == (64,)


def test_holm_rule():
    rejected, thresholds = diagnosis.holm([0.01, 0.04, 0.03, 0.5], 0.05)
    assert rejected == [True, False, False, False]  # 0.01 <= 0.05/4; 0.03 > 0.05/3 stops
    assert thresholds[0] == pytest.approx(0.0125) and thresholds[2] == pytest.approx(0.05 / 3)
    assert diagnosis.holm([0.001, 0.002], 0.05)[0] == [True, True]


def test_first_order_candidate_expectation_is_the_outer_gradient_at_the_mean_step_limit():
    """With many inner episodes the first-order candidate tends to ∇J_T(θ0 + α∇J_T(θ0)), the
    second-order ones to the exact meta-gradient."""
    with jax.enable_x64(True):
        from gmrl.envs import tabular
        mdps = tabular.random_mdps(jax.random.key(3), 2, num_states=5, num_actions=3)
        phis = jnp.zeros((2, 5, 3))
        cfg = mg.MetaGradConfig(steps=1, lr=2.0, horizon=8, oracle="finite")
        exact = np.asarray(mg.batched_exact(cfg, "dice")(mdps, phis)).reshape(2, -1)

        def first_order(mdp, phi):
            J = lambda th: tabular.finite_horizon_return(mdp, th, 8)  # noqa: E731
            return jax.grad(J)(phi + 2.0 * jax.grad(J)(phi))

        fo = np.asarray(jax.vmap(first_order)(mdps, phis)).reshape(2, -1)
    variants = [cand.Variant("second-order-unbiased", "loaded", True),
                cand.Variant("first-order", "dice", False, second_order=False)]
    mean, var = cand.expectations(mdps, phis, "maml", 2.0, 8, cand.Structure((1024,), (None,)),
                                  variants, 40, 0)
    np.testing.assert_allclose(mean[:, 0], exact, atol=6 * np.sqrt(var[:, 0].max()) + 1e-4)
    np.testing.assert_allclose(mean[:, 1], fo, atol=6 * np.sqrt(var[:, 1].max()) + 1e-4)
    assert np.abs(fo - exact).max() > 1e-2


def test_registered_surrogate_is_an_ingredient_and_a_candidate():
    def doubled_dice(log_prob, behaviour_log_prob, rewards, discounts, mask=None):
        return 2.0 * est.dice(log_prob, behaviour_log_prob, rewards, discounts, mask)

    est.register("doubled_dice", doubled_dice, uses_critic=False)
    try:
        assert "doubled_dice" in est.SAMPLED_ESTIMATORS and not est.USES_CRITIC["doubled_dice"]
        with jax.enable_x64(True):
            from gmrl.envs import tabular
            mdp = tabular.random_mdp(jax.random.key(0), 4, 2)
            cfg = mg.MetaGradConfig(steps=1, horizon=5, inner=mg.Source.parse("doubled_dice:8"))
            theta = jnp.zeros((4, 2))
            values = [mg.sampled_objective(jax.random.key(1), cfg, mdp, theta, mdp.R, name, 8)
                      for name in ("dice", "doubled_dice")]
            np.testing.assert_allclose(values[1], 2 * values[0], rtol=1e-12)
            estimate = mg.estimate_meta_gradient(jax.random.key(2), cfg, mdp, theta)
        names = [v.name for v in cand.variants("maml")]
        assert "doubled_dice[doubled_dice, reward-to-go]" in names
        with pytest.raises(InputError, match="already registered"):
            est.register("doubled_dice", doubled_dice, uses_critic=False)
        with pytest.raises(InputError, match="built-in"):
            est.register("dice", doubled_dice, uses_critic=False)
        assert np.all(np.isfinite(estimate))
    finally:
        est.unregister("doubled_dice")
    assert "doubled_dice" not in est.ESTIMATORS
    with pytest.raises(InputError, match="unknown estimator 'doubled_dice'"):
        mg.Source.parse("doubled_dice:8")


def test_plugin_file_makes_a_surrogate_usable_by_gmrl_tabular(tmp_path):
    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        "from gmrl import estimators as est\n"
        "def halved_lvc(log_prob, behaviour_log_prob, advantages, discounts, mask=None):\n"
        "    return 0.5 * est.lvc(log_prob, behaviour_log_prob, advantages, discounts, mask)\n"
        "est.register('halved_lvc', halved_lvc, uses_critic=True)\n")
    out = tmp_path / "t.json"
    run = subprocess.run([GMRL, "tabular", "--inner", "halved_lvc:8",
                          "--hessian", "halved_lvc:8", "--outer", "exact", "--mdps", "1",
                          "--repeats", "3", "--states", "4", "--actions", "2", "--out", str(out)],
                         capture_output=True, text=True,
                         env={**os.environ, est.PLUGIN_VARIABLE: str(plugin)})
    assert run.returncode == 0, run.stderr
    assert json.loads(out.read_text())["config"]["inner"]["estimator"] == "halved_lvc"
