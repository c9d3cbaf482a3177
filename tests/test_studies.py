"""The reference tabular studies (issue 3): grids, the --quick findings theory predicts, the CLI.

Findings are compared with z-scores from the jackknife standard errors of bias2 (fixed PRNG keys):
"falls"/"exceeds" means the difference is positive with z > 2; "within its CI of zero" means
|bias2| ≤ 1.96 se; "significantly positive" means z > 3.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from click.testing import CliRunner

from gmrl import stats
from gmrl.cli import cli
from gmrl.errors import InputError
from gmrl.studies import tabular as st


def quick_points(name, oracle="infinite", **where):
    points = st.study_points(name, quick=True, oracle=oracle)
    return [p for p in points if all(p[k] == v for k, v in where.items())]


def difference_z(high, low):
    return (high["bias2"] - low["bias2"]) / math.hypot(high["bias2_se"], low["bias2_se"])


def test_grids_match_the_reference_and_reject_unknown_studies():
    full = st.study_points("decompose")
    assert len(full) == 4 * 8 * 8
    assert {p["samples"] for p in full} == set(st.SAMPLE_SIZES)
    assert all(p["mdps"] == 10 and p["repeats"] == 20 and p["lr"] == 10.0 and p["steps"] == 1
               for p in full)
    assert {p["lr"] for p in st.study_points("lr")} == set(st.LRS)
    assert {p["steps"] for p in st.study_points("comp-steps")} == set(st.STEPS)
    for name in st.STUDIES:
        assert st.study_points(name, quick=True)
    with pytest.raises(InputError, match="unknown study 'nope'"):
        st.study_points("nope")


def test_fit_power_law_recovers_a_slope_and_its_error():
    x = np.array([2.0, 4, 8, 16, 32])
    rng = np.random.default_rng(0)
    y = 3.0 * x**-1.0 * np.exp(0.05 * rng.standard_normal(5))
    slope, se = stats.fit_power_law(x, y, 0.05 * y)
    assert abs(slope + 1.0) < 4 * se and 0.005 < se < 0.05


def test_lee_bias2_falls_as_inner_samples_grow():
    points = quick_points("decompose", estimator="dice", code="lee")
    rows = st.batch_points(points)
    small, large = rows[0], rows[-1]
    assert points[0]["samples"] == 2 and points[-1]["samples"] == 128
    assert difference_z(small, large) > 2, (small["bias2"], large["bias2"])
    assert small["bias2"] - 1.96 * small["bias2_se"] > 0


@pytest.mark.parametrize("estimator,positive", [("dice", False), ("loaded", False),
                                                ("maml", True)])
def test_finite_oracle_hessian_bias_is_zero_for_dice_and_loaded_only(estimator, positive):
    (point,) = quick_points("decompose", oracle="finite", estimator=estimator, code="ele",
                            samples=128)
    row = st.compute_point(point)
    z = row["bias2"] / row["bias2_se"]
    if positive:
        assert z > 3, z
    else:
        assert abs(row["bias2"]) <= 1.96 * row["bias2_se"], z


@pytest.mark.parametrize("name", ["lr", "steps"])
def test_lee_bias2_grows_with_lr_and_steps(name):
    points = quick_points(name, code="lee")
    low, high = st.batch_points(points[:1])[0], st.batch_points(points[-1:])[0]
    assert points[0][name] < points[-1][name]
    assert difference_z(high, low) > 2, (low["bias2"], high["bias2"])


def test_point_numbers_do_not_depend_on_grouping():
    tiny = dict(st.base_config("comp-samples", True, "infinite", 3), mdps=2, repeats=3,
                estimator="dice", steps=1, lr=3.0, capacity=8)
    points = [dict(tiny, samples=n) for n in (2, 8)]
    together = st.batch_points(points)
    alone = st.compute_point(points[1])
    assert together[1]["bias2"] == alone["bias2"]
    assert len(alone["param_error"]) == 1 and alone["param_error"][0] > 0


def test_every_study_runs_grid_to_report_through_the_cli(tmp_path):
    """`gmrl study all` (tiny): every study's rows, figures and report, and a combined report with a
    verdict line for every finding; `gmrl study NAME` alone, its resume and `gmrl plot`."""
    runner = CliRunner()
    tiny = ["--quick", "--no-progress", "--mdps", "2", "--repeats", "3", "--max-groups", "1"]
    out = tmp_path / "all"
    result = runner.invoke(cli, ["study", "all", "--out", str(out), *tiny])
    assert result.exit_code == 0, result.output
    expected = sum(len(st.study_points(name, quick=True, max_groups=1)) for name in st.STUDIES)
    assert f"{expected} points computed" in result.output, result.output
    assert len((out / "results.csv").read_text().splitlines()) == expected + 1
    for name in st.STUDIES:
        for file in (f"report_{name}.md", f"{name}_bias2.png", f"{name}_corr.png"):
            assert (out / file).is_file(), (name, file)
        report_text = (out / f"report_{name}.md").read_text()
        assert "## Findings" in report_text and "\n- " in report_text, (name, report_text)
    combined = (out / "report.md").read_text()
    sections = combined.split("\n## ")[1:]
    assert [s.split(".")[0] for s in sections] == ["1", "2", "3", "4", "5", "6"], combined
    for section in sections:
        assert re.search(r"— \*\*(holds|not significant|does not hold)\*\*", section), section
    single = tmp_path / "decompose"
    first = runner.invoke(cli, ["study", "decompose", "--out", str(single), *tiny])
    assert first.exit_code == 0 and "8 points computed" in first.output, first.output
    assert "## Findings" in (single / "report.md").read_text()
    again = runner.invoke(cli, ["study", "decompose", "--out", str(single), *tiny])
    assert "0 points computed, 8 already stored" in again.output, again.output
    replot = runner.invoke(cli, ["plot", str(single)])
    assert replot.exit_code == 0 and "report.md" in replot.output, replot.output


def test_verdicts_follow_the_confidence_interval_of_the_difference():
    from gmrl.studies.verdicts import compare_ends, positive_claim, zero_claim

    low, high = {"bias2": 1e-4, "bias2_se": 1e-5}, {"bias2": 5e-4, "bias2_se": 1e-4}
    assert compare_ends(low, high, +1)[0] == "holds"
    assert compare_ends(low, high, -1)[0] == "does not hold"
    assert "ratio last/first 5" in compare_ends(low, high, +1)[1]
    close = {"bias2": 1.5e-4, "bias2_se": 1e-4}
    verdict, text = compare_ends(low, close, +1)
    assert verdict == "not significant" and "smallest detectable difference 0.00028" in text
    assert zero_claim({"bias2": 1e-6, "bias2_se": 1e-6})[0] == "holds"
    assert zero_claim({"bias2": 1e-5, "bias2_se": 1e-6})[0] == "does not hold"
    assert positive_claim({"bias2": 1e-5, "bias2_se": 1e-6})[0] == "holds"
    assert positive_claim({"bias2": 1e-6, "bias2_se": 1e-6})[0] == "not significant"


def test_point_numbers_do_not_depend_on_the_compiled_loop_length():
    """K_max (max_steps) only sizes the compiled loop: step keys and masked steps keep the numbers."""
    tiny = dict(st.base_config("comp-steps", True, "infinite", 3), mdps=2, repeats=3,
                estimator="dice", steps=2, lr=3.0, theta0="zeros")
    a = st.compute_point(dict(tiny, max_steps=2))
    b = st.compute_point(dict(tiny, max_steps=5))
    assert a["bias2"] == pytest.approx(b["bias2"], rel=1e-12, abs=1e-15)
    assert a["param_error"] == pytest.approx(b["param_error"], rel=1e-12)


@pytest.mark.usefixtures("x64")
def test_lee_is_the_same_computation_for_loaded_lvc_and_maml():
    """The premise of computing their lee points once (SAME_INNER_GRADIENT)."""
    import jax

    from gmrl import metagrad as mg
    from gmrl.envs import tabular

    mdp = tabular.random_mdp(jax.random.key(0), 4, 2, 0.8, concentration=0.5)
    phi = jax.random.normal(jax.random.key(1), (4, 2))
    results = {}
    for name in st.SAME_INNER_GRADIENT + ("dice",):
        cfg = mg.MetaGradConfig(steps=2, lr=3.0, horizon=5, inner=mg.Source(name, 8),
                                hessian=mg.Source(name), outer=mg.Source(name))
        results[name] = np.asarray(mg.estimate_meta_gradient(jax.random.key(2), cfg, mdp, phi))
    for name in st.SAME_INNER_GRADIENT:
        np.testing.assert_allclose(results[name], results["maml"], rtol=1e-10, atol=1e-13)
    assert not np.allclose(results["dice"], results["maml"])


def test_a_registered_estimator_runs_in_a_study_like_the_builtin_it_copies():
    from gmrl import estimators as est

    est.register("dice_copy", est.dice, uses_critic=False)
    try:
        points = st.study_points("decompose", quick=True, overrides={"mdps": 2, "repeats": 3},
                                 estimators=["dice", "dice_copy"])
        points = [p for p in points if p["code"] == "ele" and p["samples"] == 8]
        assert [p["estimator"] for p in points] == ["dice", "dice_copy"]
        rows = [st.compute_point(p) for p in points]
        assert rows[0]["bias2"] == pytest.approx(rows[1]["bias2"], rel=1e-12)
    finally:
        est.unregister("dice_copy")
    with pytest.raises(InputError, match="unknown estimator"):
        st.study_points("decompose", estimators=["nope"])


def test_hessian_bias_report_recovers_the_theory_shape():
    from gmrl.studies import report

    rows = []
    for lr, error, delta in ((3.0, 0.5, 1.5), (4.5, 4.0, 6.0)):
        for steps in (1, 2, 3, 4):
            bias = 1e-2 * (steps - 1) * delta ** (steps - 1)
            rows.append({"study": "hessian-bias", "lr": lr, "hessian_error": error,
                         "steps": steps, "bias2": bias**2, "bias2_se": 0.01 * bias**2 + 1e-9})
    lines = report.findings(rows, "hessian-bias")
    assert len(lines) == 3, lines
    assert "within its CI of zero" in lines[0] and "Δ_H = 1.5 " in lines[0], lines[0]
    assert "Δ_H = 6 " in lines[1], lines[1]
    fits = [report._bias_vs_steps([r for r in rows if r["lr"] == lr]) for lr in (3.0, 4.5)]
    # (K−1)Δ^(K−1) over K = 2..4: the log-log slope in K grows with Δ.
    assert fits[0]["slope"] < fits[1]["slope"]
    assert "small vs large α·c" in lines[2] and "rank correlation of b with α·c over 2" in lines[2]


def test_report_names_non_finite_points_instead_of_crashing():
    from gmrl.studies import report

    rows = [{"study": "lr", "code": "lee", "lr": lr, "bias2": b, "bias2_se": se, "finite": ok}
            for lr, b, se, ok in ((1.0, 1e-4, 1e-5, True), (13.0, math.nan, math.nan, False))]
    (line,) = report.findings(rows, "lr")
    assert "NON-FINITE estimates (overflow, stored as NaN) at lr = [13.0]" in line, line
    assert report._zero_verdict(rows[1]) == "non-finite (overflow)"


RAY_SCRIPT = """
import sys
import ray

# Ray starts its processes (a fork with preexec_fn) before anything imports JAX: no fork-after-JAX
ray.init(num_cpus=2, _temp_dir=sys.argv[2], include_dashboard=False, log_to_driver=False)
from gmrl.store import ResultStore
from gmrl.studies import tabular as st
from gmrl.sweep import run_sweep

points = st.study_points("decompose", quick=True, overrides={"mdps": 2, "repeats": 3}, max_groups=1)
with ResultStore(sys.argv[1]) as store:
    run_sweep(points, None, store, backend="ray", batch_fn=st.batch_points, group_key=st.group_key,
              progress=False)
ray.shutdown()
"""


@pytest.mark.xdist_group("ray")  # one local Ray at a time under pytest -n
def test_ray_backend_gives_the_same_study_numbers_as_local(tmp_path):
    """A tiny decompose group through a local 2-CPU Ray equals the in-process numbers exactly.
    Ray runs in a fresh process that starts it before importing JAX (Ray forks with a
    preexec_fn, which in this JAX process would risk a deadlock)."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    pytest.importorskip("ray")  # the gmrl[ray] extra; a core install skips this test

    from gmrl.store import ResultStore
    from gmrl.sweep import run_sweep

    points = st.study_points("decompose", quick=True, overrides={"mdps": 2, "repeats": 3},
                             max_groups=1)
    temp_dir = tempfile.mkdtemp(prefix="gmrlray", dir="/tmp")
    results = {}
    try:
        done = subprocess.run([sys.executable, "-c", RAY_SCRIPT, str(tmp_path / "ray.sqlite"),
                               temp_dir], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    with ResultStore(tmp_path / "local.sqlite") as store:
        run_sweep(points, None, store, backend="local", batch_fn=st.batch_points,
                  group_key=st.group_key, progress=False)
        results["local"] = {r.key: r.result for r in store.rows()}
    with ResultStore(tmp_path / "ray.sqlite") as store:
        results["ray"] = {r.key: r.result for r in store.rows()}
    assert len(results["local"]) == len(points) > 1
    for key, local in results["local"].items():
        ray_result = results["ray"][key]
        assert {k: v for k, v in ray_result.items() if "seconds" not in k} == {
            k: v for k, v in local.items() if "seconds" not in k}


def _decompose_ele(estimator, bias2, se, samples=64, df=20.0):
    return {"study": "decompose", "code": "ele", "estimator": estimator, "samples": samples,
            "bias2": bias2, "bias2_se": se, "bias2_df": df}


def test_absent_hessian_bias_is_an_equivalence_verdict_with_a_margin_from_lvc():
    """Finding 4: a CI containing 0 is not evidence of absence. DiCE's tight interval lies below
    ½ of LVC's bias (margin (½)² × LVC's lower 95% end, in bias2) and holds; Loaded DiCE's wide one
    contains 0 yet reaches the margin: not significant (the old zero-in-CI rule said "holds")."""
    from gmrl.studies.verdicts import finding_lines

    rows = [_decompose_ele("lvc", 1e-4, 1e-5), _decompose_ele("maml", 2e-4, 2e-5),
            _decompose_ele("dice", 1e-7, 2e-6), _decompose_ele("loaded", 1e-6, 2e-5),
            _decompose_ele("dice", 5e-3, 1e-3, samples=8)]  # a smaller sample size is not the claim
    (_, _, lines), = [f for f in finding_lines(rows) if f[0].startswith("4.")]
    verdicts = {text.split(",")[1].split()[0]: verdict for verdict, text in lines}
    assert verdicts == {"dice": "holds", "lvc": "holds", "loaded": "not significant", "maml": "holds"}
    low = 1e-4 - stats.t_quantile(20.0) * 1e-5
    dice = next(text for _, text in lines if "ele, dice" in text)
    assert f"margin {0.25 * low:.2g}" in dice and "TOST p" in dice, dice
    # no margin without a significant LVC bias: no equivalence verdict
    rows[0] = _decompose_ele("lvc", 1e-5, 1e-5)
    (_, _, lines), = [f for f in finding_lines(rows) if f[0].startswith("4.")]
    assert all(v == "not significant" for v, t in lines if "ele, dice" in t or "ele, loaded" in t)
    # overflowed points (NaN) get no verdict instead of an error
    nan = [_decompose_ele(e, np.nan, np.nan) for e in ("lvc", "dice")]
    nan.append(_decompose_ele("maml", 1e-4, np.nan))
    (_, _, lines), = [f for f in finding_lines(nan) if f[0].startswith("4.")]
    assert [v for v, _ in lines] == ["not significant"] * 3, lines


def _injected(bias_of):
    return [{"study": "hessian-bias", "lr": 3.0, "hessian_error": c, "steps": k,
             "bias2": bias_of(c, k) ** 2, "bias2_se": 0.01 * bias_of(c, k) ** 2, "bias2_df": 30.0}
            for c in (0.5, 4.0) for k in (1, 2, 3)]


def test_injected_error_finding_is_tested_against_the_linear_null():
    """Finding 5: a bias linear in c (bias2 ∝ c²) grows (4/0.5)² = 64× more at c = 4 with no
    compounding; that is "not significant" against the linear null (the old "growth ratio > 1"
    test said "holds"); a bias compounding in c·K holds."""
    from gmrl.studies.verdicts import finding_lines

    def finding5(rows):
        (_, _, lines), = [f for f in finding_lines(rows) if f[0].startswith("5.")]
        return lines

    (linear,) = finding5(_injected(lambda c, k: 0.01 * c * k))
    assert linear[0] == "not significant" and "against the linear null's 64" in linear[1], linear
    (compounding,) = finding5(_injected(lambda c, k: 0.01 * c * k * (1 + 0.1 * c) ** (k - 1)))
    assert compounding[0] == "holds", compounding
    (weaker,) = finding5(_injected(lambda c, k: 0.01 * np.sqrt(c) * k))
    assert weaker[0] == "does not hold", weaker


def test_reports_carry_relative_bias_and_significant_mdps_beside_bias2():
    from gmrl.studies import report
    from gmrl.studies.verdicts import positive_claim

    rng = np.random.default_rng(0)
    truth = rng.normal(size=(4, 6))
    summary = stats.summarize(truth[:, None] + 0.5 + 0.1 * rng.normal(size=(4, 20, 6)), truth)
    summary.pop("per_mdp")
    rows = [{"study": "lr", "code": "lee", "lr": lr, **summary} for lr in (1.0, 3.0)]
    (line,) = report.findings(rows, "lr")
    assert f"rel. bias {summary['rel_bias']:.2g} [" in line and "4/4 MDPs significant" in line, line
    assert "significant in 4 of 4 MDPs" in positive_claim(rows[0])[1]
    # ‖E ĝ − g*‖/‖g*‖ for a bias of 0.5 per coordinate
    want = 0.5 * np.sqrt(6 * 4) / np.linalg.norm(truth)
    assert summary["rel_bias_ci_low"] <= want <= summary["rel_bias_ci_high"]
