"""`gmrl tabular`: the table, the JSON file, the user's MDP, and one-line errors for bad input."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from gmrl.cli import main
from gmrl.envs import tabular

from .reference_numpy import lirpg_meta_gradient, maml_meta_gradient

FIXTURES = Path(__file__).parent / "fixtures"


def run(argv, capsys):
    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def mdp_file(tmp_path):
    with jax.enable_x64(True):
        mdp = tabular.random_mdp(jax.random.key(42), 6, 3, 0.8)
    path = tmp_path / "mdp.npz"
    tabular.save_mdp(path, mdp)
    return path


def test_table_and_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    code, text, err = run(["tabular", "--steps", "2", "--lr", "3", "--mdps", "2", "--repeats", "4",
                           "--states", "4", "--actions", "2", "--horizon", "5",
                           "--inner", "dice:8", "--hessian", "loaded:8", "--outer", "exact",
                           "--out", str(out)], capsys)
    assert code == 0, err
    for column in ("corr", "std_sum", "mse_of_mean", "bias2 ± 95% CI"):
        assert column in text
    data = json.loads(out.read_text())
    assert data["config"]["inner"] == {"estimator": "dice", "samples": 8}
    assert np.asarray(data["exact_meta_gradient"]).shape == (2, 4, 2)
    assert np.asarray(data["mean_estimate"]).shape == (2, 4, 2)
    assert len(data["per_mdp"]["bias2"]) == 2 and "bias2_ci_low" in data["summary"]


@pytest.mark.parametrize("problem", ["maml", "lirpg"])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_user_mdp_exact_meta_gradient_matches_independent_implementation(
        tmp_path, capsys, mdp_file, problem, steps):
    out = tmp_path / "r.json"
    code, _, err = run(["tabular", "--mdp", str(mdp_file), "--problem", problem, "--steps", str(steps),
                        "--lr", "10", "--repeats", "3", "--inner", "exact", "--hessian", "exact",
                        "--outer", "exact", "--out", str(out)], capsys)
    assert code == 0, err
    exact = np.asarray(json.loads(out.read_text())["exact_meta_gradient"])[0]
    data = np.load(mdp_file)
    if problem == "maml":  # default --theta0 zeros: the inner loop starts at the uniform policy
        ref = maml_meta_gradient(data["P"], data["R"], 0.8, 0, np.zeros((6, 3)), 10.0, steps)
    else:
        ref = lirpg_meta_gradient(data["P"], data["R"], 0.8, 0, np.zeros((6, 3)), 10.0, steps)
    assert np.linalg.norm(exact - ref) <= 1e-8 * np.linalg.norm(ref)


def _bad_npz(tmp_path, **change):
    arrays = dict(P=np.full((3, 2, 3), 1 / 3), R=np.zeros((3, 2)), gamma=np.array(0.8)) | change
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("args, message", [
    (["--inner", "dice:0"], "sample size in 'dice:0' must be an integer >= 1"),
    (["--lr", "-1"], "inner learning rate must be > 0"),
    (["--gamma", "1"], "gamma must be in [0, 1)"),
    (["--inner", "foo:3"], "unknown estimator 'foo'"),
    (["--repeats", "2"], "--repeats must be >= 3"),
    ("rows", "rows of P must sum to 1"),
    ("shape", "R must have shape"),
    ("nan", "R contains NaN"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    if args == "rows":
        args = ["--mdp", _bad_npz(tmp_path, P=np.full((3, 2, 3), 0.5))]
    elif args == "shape":
        args = ["--mdp", _bad_npz(tmp_path, R=np.zeros((2, 2)))]
    elif args == "nan":
        args = ["--mdp", _bad_npz(tmp_path, R=np.array([[0.0, np.nan]] * 3))]
    out = tmp_path / "out.json"
    code, text, err = run(["tabular", *args, "--out", str(out)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("gmrl: error: ") and message in err, err
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("problem", ["maml", "lirpg"])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_reference_seed42_mdp_exact_meta_gradients_match_the_reference_code(
        tmp_path, capsys, problem, steps):
    """The reference code's own exact meta-gradients on its seed-42 MDP (α = 10, γ = 0.8, θ0 = 0),
    recorded by running it in float64 (benchmarks/official/ref_driver.py --float64, code eee,
    torch 2.13.0; its float32 default agrees to ~2e-6 only), equal `gmrl tabular --mdp` with
    default settings to 1e-8 relative (measured: ≤ 5e-15)."""
    fixture = np.load(FIXTURES / "reference_seed42.npz")
    mdp_path = tmp_path / "ref.npz"
    np.savez(mdp_path, P=fixture["P"], R=fixture["R"], gamma=0.8)
    out = tmp_path / "r.json"
    code, _, err = run(["tabular", "--mdp", str(mdp_path), "--problem", problem, "--steps", str(steps),
                        "--repeats", "3", "--inner", "exact", "--hessian", "exact", "--outer", "exact",
                        "--out", str(out)], capsys)
    assert code == 0, err
    exact = np.asarray(json.loads(out.read_text())["exact_meta_gradient"])[0]
    reference = fixture[f"{problem}_K{steps}"]
    assert np.abs(exact - reference).max() <= 1e-8 * np.abs(reference).max()


def test_theta0_choices(tmp_path, capsys, mdp_file):
    """--theta0 normal and a FILE.npy change MAML's θ0; the choice is in the header and the JSON;
    LIRPG refuses anything but zeros."""
    theta = np.linspace(-1, 1, 18).reshape(6, 3)
    np.save(tmp_path / "theta.npy", theta)
    exact = {}
    for choice in ("zeros", "normal", str(tmp_path / "theta.npy")):
        out = tmp_path / "r.json"
        code, text, err = run(["tabular", "--mdp", str(mdp_file), "--repeats", "3", "--theta0", choice,
                               "--inner", "exact", "--hessian", "exact", "--outer", "exact",
                               "--out", str(out)], capsys)
        assert code == 0, err
        assert f"theta0={choice}" in text
        data = json.loads(out.read_text())
        exact[choice] = np.asarray(data["exact_meta_gradient"])[0]
    assert data["config"]["theta0"]["table"] == theta.tolist()
    data_mdp = np.load(mdp_file)
    ref = maml_meta_gradient(data_mdp["P"], data_mdp["R"], 0.8, 0, theta, 10.0, 1)
    assert np.linalg.norm(exact[str(tmp_path / "theta.npy")] - ref) <= 1e-8 * np.linalg.norm(ref)
    assert not np.allclose(exact["zeros"], exact["normal"])
    code, _, err = run(["tabular", "--mdp", str(mdp_file), "--problem", "lirpg", "--theta0", "normal"],
                       capsys)
    assert code == 2 and "theta0 must be 'zeros'" in err and len(err.strip().splitlines()) == 1
    np.save(tmp_path / "bad.npy", np.zeros((2, 2)))
    code, _, err = run(["tabular", "--mdp", str(mdp_file), "--theta0", str(tmp_path / "bad.npy")], capsys)
    assert code == 2 and "must have shape [S, A] = (6, 3)" in err


def test_json_carries_the_printed_per_mdp_interval_and_relative_bias(tmp_path, capsys):
    out = tmp_path / "r.json"
    code, text, err = run(["tabular", "--mdps", "2", "--repeats", "10", "--states", "4", "--actions", "2",
                           "--horizon", "5", "--inner", "dice:4", "--hessian", "exact", "--outer", "exact",
                           "--out", str(out)], capsys)
    assert code == 0, err
    per = json.loads(out.read_text())["per_mdp"]
    low, high, value = (np.asarray(per[k]) for k in ("bias2_ci_low", "bias2_ci_high", "bias2"))
    assert low.shape == (2,) and np.all(low <= value) and np.all(value <= high)
    assert f"{value[0]:>13.4g} ± {(high[0] - low[0]) / 2:<10.3g}" in text  # the row prints this interval
    assert np.all(np.asarray(per["rel_bias_ci_low"]) <= np.asarray(per["rel_bias_ci_high"]))
    assert "MDP(s) with bias2 significantly above 0" in text
