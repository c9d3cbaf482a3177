"""Bad input to `gmrl tabular` and `gmrl study`, as a new user would try it: exit status 2, one line
`gmrl: error: …` naming the problem, no traceback, no partial output — checked before computing
wherever the problem can be known then."""

import contextlib
import json
import os
import sqlite3
import zipfile

import numpy as np
import pytest

from gmrl.cli import main
from gmrl.errors import InputError

from .test_cli_tabular import run

S = ["--mdps", "1", "--states", "3", "--actions", "2", "--repeats", "3", "-T", "5",
     "--inner", "dice:4", "--hessian", "dice:4", "--outer", "dice:4"]
Q = ["--quick", "--mdps", "2", "--repeats", "3", "--max-groups", "1", "--no-progress"]


def assert_one_line_error(code, err, *needles):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("gmrl: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _mdp_files(tmp_path):
    P = np.full((3, 2, 3), 1 / 3)
    R = np.zeros((3, 2))
    good = tmp_path / "good.npz"
    np.savez(good, P=P, R=R, gamma=0.8)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:60])
    npy = tmp_path / "array.npy"
    np.save(npy, P)
    two_gammas = tmp_path / "gammas.npz"
    np.savez(two_gammas, P=P, R=R, gamma=np.array([0.8, 0.9]))
    text_gamma = tmp_path / "textgamma.npz"
    np.savez(text_gamma, P=P, R=R, gamma=np.array("abc"))
    text_p = tmp_path / "textp.npz"
    np.savez(text_p, P=np.full((3, 2, 3), "x"), R=R, gamma=0.8)
    return {"truncated": (truncated, "cannot read MDP file"),
            "npy": (npy, "not an .npz archive"),
            "two gammas": (two_gammas, "gamma in"),
            "text gamma": (text_gamma, "gamma in"),
            "text P": (text_p, "P must hold real numbers")}


@pytest.mark.parametrize("case", ["truncated", "npy", "two gammas", "text gamma", "text P"])
def test_invalid_mdp_files(tmp_path, capsys, case):
    path, needle = _mdp_files(tmp_path)[case]
    assert_one_line_error(*run(["tabular", "--mdp", str(path)], capsys)[::2], needle)


def test_a_sample_size_beyond_memory_is_refused_before_computing(capsys):
    args = ["tabular", *S[:-6], "--inner", "dice:100000000", "--hessian", "dice:4", "--outer", "dice:4"]
    assert_one_line_error(*run(args, capsys)[::2], "GiB", "use fewer samples")


def test_a_horizon_beyond_the_limit_is_refused(capsys):
    assert_one_line_error(*run(["tabular", *S, "--horizon", "99999999999999999999"], capsys)[::2],
                          "horizon T must be at most 100,000")


@pytest.mark.parametrize("target", ["folder", "under_a_file", "proc"])
def test_unwritable_out_is_refused_before_computing(tmp_path, capsys, target):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "d.json").mkdir()
    out = {"folder": tmp_path / "d.json", "under_a_file": tmp_path / "afile" / "x.json",
           "proc": "/proc/gmrl-cannot-write/x.json"}[target]
    code, _, err = run(["tabular", *S, "--out", str(out)], capsys)
    assert_one_line_error(code, err, "--out")


def test_exploding_estimates_are_an_error_not_a_nan_table(tmp_path, capsys):
    out = tmp_path / "a.json"
    args = ["tabular", "--mdps", "2", "--repeats", "5", "--inner", "dice:16", "--hessian", "dice:16",
            "--outer", "dice:16", "--lr", "1000", "--steps", "10", "--out", str(out)]
    assert_one_line_error(*run(args, capsys)[::2], "--lr")
    assert not out.exists()


def test_too_few_repeats_for_a_study_is_refused_at_once(tmp_path, capsys):
    code, _, err = run(["study", "decompose", "--quick", "--mdps", "2", "--repeats", "2",
                        "--max-groups", "1", "--out", str(tmp_path / "d")], capsys)
    assert code == 2 and "--repeats" in err and "Traceback" not in err
    assert not (tmp_path / "d" / "results.sqlite").exists()


@pytest.fixture(scope="module")
def study_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study") / "D"
    main_code = None
    try:
        main(["study", "comp-samples", *Q, "--out", str(folder)])
    except SystemExit as exit_:
        main_code = exit_.code
    assert main_code in (None, 0)
    return folder


@pytest.mark.parametrize("second", [["study", "decompose"], ["study", "lr"],
                                    ["study", "comp-samples", "--oracle", "finite"]])
def test_a_folder_holds_one_study_configuration(study_folder, capsys, second):
    before = sorted(os.listdir(study_folder))
    code, _, err = run([*second, *Q, "--out", str(study_folder)], capsys)
    assert_one_line_error(code, err, "holds a tabular study with other settings")
    assert sorted(os.listdir(study_folder)) == before
    assert "comp-samples" in (study_folder / "report.md").read_text()


def test_default_out_folders_name_their_settings():
    from gmrl.studies.run import default_out

    plain = default_out("decompose", False, "infinite", 0, "zeros")
    assert str(plain) == os.path.join("results", "decompose")
    assert str(default_out("decompose", True, "finite", 3, "normal")) == os.path.join(
        "results", "decompose-quick-finite-seed3-theta0-normal")


def test_a_damaged_store_is_one_line(tmp_path, capsys, study_folder):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(study_folder, copy)
    store = copy / "results.sqlite"
    with sqlite3.connect(store) as conn:  # fold the write-ahead log in, so the pages are in the file
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(store.read_bytes())
    assert len(data) >= 3 * 4096, len(data)
    rng = np.random.default_rng(0)
    for page in range(1, len(data) // 4096):  # the cells at the end of every page after the first
        data[page * 4096 + 3900:page * 4096 + 4090] = rng.integers(0, 256, 190, dtype=np.uint8).tobytes()
    store.write_bytes(bytes(data))
    for argv in (["plot", str(copy)], ["study", "comp-samples", *Q, "--out", str(copy)]):
        code, _, err = run(argv, capsys)
        assert_one_line_error(code, err)
        assert "damaged" in err or "cannot open" in err or "malformed" in err, err


@contextlib.contextmanager
def held_by_another_run(folder):
    """FOLDER/.gmrl.lock locked through its own open file, as another gmrl process holds it
    (flock locks conflict between open files, even inside one process)."""
    import fcntl

    with open(folder / ".gmrl.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield


def test_a_folder_in_use_by_another_run_is_refused(tmp_path, capsys):
    folder = tmp_path / "busy"
    folder.mkdir()
    with held_by_another_run(folder):
        code, _, err = run(["study", "decompose", *Q, "--out", str(folder)], capsys)
    assert_one_line_error(code, err, "in use by another gmrl run")
    assert sorted(os.listdir(folder)) == [".gmrl.lock"]  # no config.json, no store


def test_claim_folder_takes_the_lock_before_writing(tmp_path):
    """Two configurations into one folder: while one run holds the folder, a second one with
    other settings is refused and the first one's config.json stays (today's claim_folder
    wrote config.json before the lock, so a racing run could leave its settings over the
    other's store; mutation: writing config.json before taking the lock fails here)."""
    from gmrl.runs import claim_folder

    folder = tmp_path / "race"
    claim_folder(folder, {"studies": ["decompose"], "seed": 1}, "tabular study")
    first = (folder / "config.json").read_text()
    with held_by_another_run(folder):
        for seed in (1, 2):  # the same or another configuration: refused while the folder is held
            with pytest.raises(InputError, match="in use by another gmrl run"):
                claim_folder(folder, {"studies": ["decompose"], "seed": seed}, "tabular study")
    assert (folder / "config.json").read_text() == first
    with pytest.raises(InputError, match="holds a tabular study with other settings"):
        claim_folder(folder, {"studies": ["decompose"], "seed": 2}, "tabular study")
    assert (folder / "config.json").read_text() == first


def test_claimed_folders_race_one_wins_the_other_is_refused(tmp_path):
    """Threads claim one new folder with two configurations at once, 20 times: each time
    exactly one claim wins and config.json is the winner's."""
    import threading

    from gmrl.runs import claim_folder

    for attempt in range(20):
        folder = tmp_path / f"race{attempt}"
        barrier, outcome = threading.Barrier(2), {}

        def claim(seed, folder=folder, barrier=barrier, outcome=outcome):
            barrier.wait()
            try:
                claim_folder(folder, {"studies": ["decompose"], "seed": seed}, "tabular study")
                outcome[seed] = "won"
            except InputError as err:
                outcome[seed] = str(err)

        threads = [threading.Thread(target=claim, args=(s,)) for s in (1, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        winners = [s for s, o in outcome.items() if o == "won"]
        assert len(winners) == 1, outcome
        saved = json.loads((folder / "config.json").read_text())
        assert saved["config"]["seed"] == winners[0], (outcome, saved)


def test_an_unreachable_ray_address_fails_at_once(tmp_path, capsys):
    pytest.importorskip("ray")
    code, _, err = run(["study", "decompose", *Q, "--backend", "ray", "--address", "127.0.0.1:1",
                        "--out", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err, "no Ray cluster answers at 127.0.0.1:1")


def test_zip_error_type_is_covered():
    """The truncated-archive case above raises zipfile.BadZipFile inside numpy, not OSError."""
    assert not issubclass(zipfile.BadZipFile, OSError)
