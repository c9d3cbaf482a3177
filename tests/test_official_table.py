"""The side-by-side harness's statistics and table (benchmarks/official/table.py) on a recorded fixture.

tests/fixtures/official_small.json is a results.json of `benchmarks/official/run.py` at a tiny
scale (2 MDPs × 5 reference repeats, 100 gmrl repeats per MDP, 5 LOLA updates). The harness
itself needs the reference checkout and torch, so it is not run here; this checks that the
numbers it prints are the statistics its documentation defines, computed independently below.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "official_small.json"


def _load_table():
    path = ROOT / "benchmarks" / "official" / "table.py"
    spec = importlib.util.spec_from_file_location("official_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


table = _load_table()


@pytest.fixture(scope="module")
def results():
    with open(FIXTURE) as f:
        return json.load(f)


def _pearson(x, y):
    return float(np.corrcoef(np.asarray(x, float), np.asarray(y, float))[0, 1])


def _std_sum(rows):
    a = np.asarray(rows, float)
    return sum(math.sqrt(sum((v - a[:, j].mean()) ** 2 for v in a[:, j]) / (len(a) - 1))
               for j in range(a.shape[1]))


def _expected(record):
    ref, gm = record["reference"], record["gmrl"]
    per_mdp = [[_pearson(e, o) for e in est] for est, o in zip(ref["estimates"], ref["oracle"], strict=True)]
    m = len(per_mdp)
    corr_ref = np.mean([np.mean(c) for c in per_mdp])
    corr_ref_se = math.sqrt(sum(np.var(c, ddof=1) / len(c) for c in per_mdp)) / m
    corr_g = np.mean([np.mean(c) for c in gm["corr"]])
    corr_g_se = math.sqrt(sum(np.var(c, ddof=1) / len(c) for c in gm["corr"])) / m
    var_values, var_se2 = [], 0.0
    for est in ref["estimates"]:
        r = len(est)
        full = _std_sum(est)
        loo = [_std_sum([e for k, e in enumerate(est) if k != i]) for i in range(r)]
        var_values.append(full)
        var_se2 += (r - 1) / r * sum((v - np.mean(loo)) ** 2 for v in loo)
    var_ref, var_ref_se = np.mean(var_values), math.sqrt(var_se2) / m
    var_g = np.mean([np.mean(c) for c in gm["std_sums"]])
    var_g_se = math.sqrt(sum(np.var(c, ddof=1) / len(c) for c in gm["std_sums"])) / m
    return {
        "corr_ref": corr_ref, "corr_ref_se": corr_ref_se, "corr_gmrl": corr_g, "corr_gmrl_se": corr_g_se,
        "corr_z": (corr_ref - corr_g) / math.hypot(corr_ref_se, corr_g_se),
        "var_ref": var_ref, "var_ref_se": var_ref_se, "var_gmrl": var_g, "var_gmrl_se": var_g_se,
        "var_z": (var_ref - var_g) / math.hypot(var_ref_se, var_g_se),
        "ratio": ref["wall_s"] / gm["wall_s"], "cpu_ratio": ref["cpu_s"] / gm["cpu_s"],
    }


def test_rows_match_an_independent_computation(results):
    assert len(results["rows"]) == 2
    for record in results["rows"].values():
        got = table.tabular_row(record)
        want = _expected(record)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        assert (got["mdps"], got["ref_repeats"], got["gmrl_repeats"]) == (2, 5, 100)
        # the recorded per-repeat estimates reproduce the reference's own saved averages
        assert got["corr_npy_diff"] < 1e-6 and got["var_npy_rel"] < 1e-6
        assert got["oracle_rel"] < 1e-5  # its float32 oracle against gmrl's float64 exact gradient


def test_recorded_numbers(results):
    rows = {n: table.tabular_row(r) for n, r in results["rows"].items()}
    dice = rows["dice lll 32"]
    assert dice["corr_ref"] == pytest.approx(0.2136, abs=1e-4)
    assert dice["corr_gmrl"] == pytest.approx(0.1163, abs=1e-4)
    assert dice["var_ref"] == pytest.approx(12.95, abs=0.01)
    assert rows["LIRPG lvc ele 64 K=2"]["corr_z"] == pytest.approx(-0.17, abs=0.01)


def test_format_and_checks(results):
    rows = [table.tabular_row(r) for r in results["rows"].values()]
    lola = table.lola_row(results["lola"])
    text = table.format_table(rows, lola)
    lines = text.splitlines()
    assert lines[0].startswith("| row |") and len(lines) == 2 + 2 + 1 + 3
    assert "| dice lll 32 | 2×5 / 2×100 | 0.2136 ± 0.0855 | 0.1163 ± 0.0158 | +1.12 |" in text
    assert table.checks(rows, lola) == []
    # a gmrl correlation shifted far away must be flagged, as must a diverging LOLA trajectory
    shifted = json.loads(json.dumps(next(iter(results["rows"].values()))))
    shifted["gmrl"]["corr"] = [[c + 0.5 for c in cs] for cs in shifted["gmrl"]["corr"]]
    flagged = table.checks([table.tabular_row(shifted)])
    assert len(flagged) == 1 and "corr_z" in flagged[0]
    bad = dict(results["lola"], theta_gmrl=(np.asarray(results["lola"]["theta_gmrl"]) + 0.01).tolist())
    assert any("LOLA" in line for line in table.checks([], table.lola_row(bad)))


def test_paired_difference(results):
    record = next(iter(results["rows"].values()))
    other = json.loads(json.dumps(record))
    rng = np.random.default_rng(0)
    other["reference"]["estimates"] = (np.asarray(record["reference"]["estimates"])
                                       + 1e-3 * rng.normal(size=(2, 5, 100))).tolist()
    got = table.paired_difference(record, other)
    a = table.centred_cosine(record["reference"]["estimates"], record["reference"]["oracle"])
    b = table.centred_cosine(other["reference"]["estimates"], other["reference"]["oracle"])
    assert got["diff"] == pytest.approx(float(np.mean(a - b)))
    assert got["se"] == pytest.approx(float(np.std(a - b, ddof=1) / math.sqrt(10)))
    other["reference"]["oracle"][0][0] += 1.0
    with pytest.raises(ValueError):
        table.paired_difference(record, other)


def test_lola_row(results):
    record = results["lola"]
    got = table.lola_row(record)
    a, b = np.asarray(record["theta_ref"]), np.asarray(record["theta_gmrl"])
    assert got["updates"] == 5 == len(a) == len(b)
    assert got["max_abs_theta_diff"] == pytest.approx(np.max(np.abs(a - b)))
    assert got["max_abs_theta_diff"] < 1e-4  # float32 reference against gmrl
    assert got["ratio"] == pytest.approx(record["ref_s_per_update_seed"] / record["gmrl_s_per_update_seed"])
