"""Probes of every command's contract under bad input (issue 23): through the real entry point
`gmrl.cli.main`, each bad input gives exit status 2, exactly one line `gmrl: error: …` on stderr,
no traceback, and leaves the probe's folder as it was (nothing created, nothing changed).

Most probes run in this process (`main(argv)`, fast: they fail before any computation); the
ones that must be timed or would endanger the machine if a guard broke (a 10⁸ size) and the
Ctrl-C probe run in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gmrl.cli import main

HUGE_SEED = "99999999999999999999999"
TAB = ["--mdps", "1", "--states", "3", "--actions", "2", "--repeats", "3", "-T", "5",
       "--inner", "dice:4", "--hessian", "dice:4", "--outer", "dice:4"]
CHECK = ["--mdps", "1", "--repeats", "3", "-T", "5", "--no-progress"]
USER_CODE = '''
import sys, time
import numpy as np


def _sampled(task, rng):
    task.sample(np.zeros((20, 5)), 2, rng)


def calls_exit(task, rng):
    _sampled(task, rng)
    sys.exit(0)


def exits_with_message(task, rng):
    raise SystemExit("msg")


def raises_keyboard_interrupt(task, rng):
    raise KeyboardInterrupt


def returns_complex(task, rng):
    _sampled(task, rng)
    return np.zeros((20, 5)) + 1j


def returns_objects(task, rng):
    return np.array([[object()] * 5] * 20)


def returns_none(task, rng):
    _sampled(task, rng)


def hangs(task, rng):
    while True:
        time.sleep(0.05)


def fine(task, rng):
    _sampled(task, rng)
    return np.zeros((20, 5))
'''


def _inputs(root: Path) -> dict[str, Path]:
    """The bad files and foreign folders the probes feed in (created once per test)."""
    files = root / "in"
    files.mkdir()
    (files / "user.py").write_text(USER_CODE)
    (files / "empty.npy").write_bytes(b"")
    (files / "text.npy").write_text("1 2 3\n4 5 6\n")
    np.save(files / "nan.npy", np.full((20, 5), np.nan))
    np.savez(files / "zip.npz", a=np.zeros((20, 5)))
    os.replace(files / "zip.npz", files / "zip.npy")
    rng = np.random.default_rng(0)
    np.savez_compressed(files / "good.npz", P=rng.dirichlet(np.ones(20), (20, 5)),
                        R=rng.normal(size=(20, 5)), gamma=0.8)
    data = bytearray((files / "good.npz").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # inside the deflate stream of P: zlib error or bad CRC
    (files / "zlib.npz").write_bytes(bytes(data))
    (files / "text.npz").write_text("not an archive\n")
    (files / "afile").write_text("x")
    P = rng.dirichlet(np.ones(3), (3, 2))
    np.savez(files / "complex.npz", P=P + 0j, R=np.zeros((3, 2)), gamma=0.8)
    np.savez(files / "huge_r.npz", P=P, R=np.full((3, 2), 1e300), gamma=0.8)
    from gmrl.runs import claim_folder
    from gmrl.store import ResultStore, config_key

    claim_folder(root / "tabular_study", {"studies": ["decompose"], "quick": True, "seed": 0},
                 "tabular study")
    claim_folder(root / "lola_run", {"study": "lola", "variant": "lola", "seeds": 2},
                 "LOLA run")
    (root / "bare_store").mkdir()
    with ResultStore(root / "bare_store" / "results.sqlite"):
        pass
    (root / "mgrl_folder").mkdir()
    with ResultStore(root / "mgrl_folder" / "results.sqlite") as store:
        config = {"study": "mgrl", "algo": "a2c", "env": "CartPole-v1"}
        store.put(config_key(config), config, {"summary": {}}, 1.0)
    return {"in": files, "new": root / "new" / "deeper", "root": root}


def _tree(root: Path) -> dict[str, str]:
    """Every path under root with a digest of its content (folders: 'dir')."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        found[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _one_error(code, err, words=()):
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("gmrl: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


# (id, argv with {in}/{new}/{root} placeholders, words the line must hold)
PROBES = [
    # Why 1, 3: sizes, seeds and numbers checked before allocating
    ("tabular-states", ["tabular", *TAB, "--states", "1000000"], ["--states", "at most"]),
    ("tabular-seed", ["tabular", *TAB, "--seed", HUGE_SEED], ["--seed"]),
    ("tabular-seed-negative", ["tabular", *TAB, "--seed", "-1"], ["--seed"]),
    ("lola-inner", ["lola", "--inner", "100000000", "--out", "{new}"], ["--inner", "at most"]),
    ("lola-horizon", ["lola", "--horizon", "100000000", "--out", "{new}"], ["--horizon", "at most"]),
    ("lola-seed", ["lola", "--seed", HUGE_SEED, "--out", "{new}"], ["--seed"]),
    ("mgrl-seeds", ["mgrl", "--env", "CartPole-v1", "--seeds", "100000000", "--out", "{new}"],
     ["--seeds", "at most"]),
    ("mgrl-frames", ["mgrl", "--frames", "100000000000000000000", "--out", "{new}"], ["--frames"]),
    ("mgrl-seed", ["mgrl", "--seed", HUGE_SEED, "--out", "{new}"], ["--seed"]),
    ("study-seed", ["study", "decompose", "--seed", HUGE_SEED, "--out", "{new}"], ["--seed"]),
    ("check-repeats", ["check", "{in}/user.py:fine", "--repeats", "100000000"],
     ["--repeats", "at most"]),
    ("check-seed", ["check", "{in}/user.py:fine", "--seed", HUGE_SEED], ["--seed"]),
    # Why 6: bad values named before running
    ("lola-outer-lr-inf", ["lola", "--outer-lr", "inf", "--out", "{new}"], ["--outer-lr"]),
    ("mgrl-lr-inf", ["mgrl", "--lr", "inf", "--out", "{new}"], ["--lr"]),
    ("mgrl-outer-kl-nan", ["mgrl", "--outer-kl", "nan", "--out", "{new}"], ["--outer-kl"]),
    ("mgrl-outer-kl-negative", ["mgrl", "--outer-kl", "-5", "--out", "{new}"], ["--outer-kl"]),
    ("study-mgrl-lr-inf", ["study", "mgrl", "--lr", "inf", "--out", "{new}"], ["--lr"]),
    ("study-mgrl-quick-overrides", ["study", "mgrl", "--quick", "--seeds", "0", "--frames", "-5",
                                    "--out", "{new}"], ["--quick", "--frames", "--seeds"]),
    ("study-mgrl-quick-games", ["study", "mgrl", "--quick", "--games", "Asterix-MinAtar",
                                "--out", "{new}"], ["--quick", "--games"]),
    ("mgrl-bias-inner-lr-inf", ["mgrl-bias", "{root}/lola_run", "--inner-lr", "inf"],
     ["--inner-lr"]),
    ("mgrl-bias-not-a-run", ["mgrl-bias", "{in}", "--out", "{new}"], []),
    ("study-estimators-empty", ["study", "decompose", "--estimators", ",", "--out", "{new}"],
     ["--estimators"]),
    ("tabular-lr-inf-new-out", ["tabular", *TAB, "--lr", "inf", "--out", "{new}/x.json"], ["--lr"]),
    # Why 3, 4: damaged files
    ("tabular-theta0-empty", ["tabular", *TAB, "--theta0", "{in}/empty.npy"], ["empty"]),
    ("tabular-theta0-zip", ["tabular", *TAB, "--theta0", "{in}/zip.npy"], ["zip.npy"]),
    ("tabular-mdp-zlib", ["tabular", "--mdp", "{in}/zlib.npz", "--out", "{new}/x.json"],
     ["zlib.npz"]),
    ("tabular-mdp-text", ["tabular", "--mdp", "{in}/text.npz"], ["not an .npz archive"]),
    ("tabular-mdp-complex", ["tabular", "--mdp", "{in}/complex.npz"], ["P", "real numbers"]),
    ("tabular-mdp-huge-rewards", ["tabular", "--mdp", "{in}/huge_r.npz"], ["|R| = 1e+300"]),
    ("study-theta0-zip", ["study", "decompose", "--theta0", "{in}/zip.npy", "--out", "{new}"],
     ["zip.npy"]),
    ("check-theta0-text", ["check", "{in}/user.py:fine", *CHECK, "--theta0", "{in}/text.npy"],
     ["--theta0", "text.npy"]),
    ("check-theta0-empty", ["check", "{in}/user.py:fine", *CHECK, "--theta0", "{in}/empty.npy"],
     ["--theta0", "empty"]),
    ("check-theta0-zip", ["check", "{in}/user.py:fine", *CHECK, "--theta0", "{in}/zip.npy"],
     ["--theta0", "zip"]),
    ("check-theta0-nan", ["check", "{in}/user.py:fine", *CHECK, "--theta0", "{in}/nan.npy"],
     ["--theta0", "NaN"]),
    ("check-thetas-text", ["check", "{in}/user.py:fine", "--game", "ipd", "--thetas",
                           "{in}/text.npy"], ["--thetas"]),
    # Why 4, 6, 7: user code in gmrl check
    ("check-sys-exit-0", ["check", "{in}/user.py:calls_exit", *CHECK], ["sys.exit(0)"]),
    ("check-system-exit-msg", ["check", "{in}/user.py:exits_with_message", *CHECK],
     ["sys.exit('msg')"]),
    ("check-keyboard-interrupt", ["check", "{in}/user.py:raises_keyboard_interrupt", *CHECK],
     ["KeyboardInterrupt"]),
    ("check-complex", ["check", "{in}/user.py:returns_complex", *CHECK], ["complex"]),
    ("check-object", ["check", "{in}/user.py:returns_objects", *CHECK], ["dtype object"]),
    ("check-none", ["check", "{in}/user.py:returns_none", *CHECK], ["returned None"]),
    ("check-hang", ["check", "{in}/user.py:hangs", *CHECK, "--timeout", "1"], ["--timeout"]),
    ("check-out-under-a-file", ["check", "{in}/user.py:fine", *CHECK, "--out",
                                "{in}/afile/x.json"], ["is a file, not a folder"]),
    # Why 2: one folder, one command and configuration
    ("study-lola-into-tabular-study", ["study", "lola", "--seeds", "2", "--updates", "2",
                                       "--out", "{root}/tabular_study"], ["a tabular study"]),
    ("study-into-lola-run", ["study", "decompose", "--quick", "--out", "{root}/lola_run"],
     ["a LOLA run"]),
    ("study-lola-into-foreign-store", ["study", "lola", "--seeds", "2", "--updates", "2",
                                       "--out", "{root}/bare_store"], ["results.sqlite"]),
    ("plot-mgrl-folder", ["plot", "{root}/mgrl_folder"], ["gmrl study mgrl"]),
    # Why 7: click's usage errors as one line
    ("usage-wrong-type", ["tabular", "--steps", "x"], ["--steps"]),
    ("usage-unknown-option", ["lola", "--bogus"], ["--bogus"]),
    ("usage-missing-option", ["mgrl"], ["--out"]),
    ("usage-unknown-command", ["nosuch"], ["nosuch"]),
]


def test_every_probe_is_one_line_and_leaves_nothing(tmp_path, capsys):
    """All in-process probes in one test (they share one set of input files and this
    process's compiled functions); a failure names the probe."""
    places = _inputs(tmp_path)
    capsys.readouterr()
    before = _tree(tmp_path)
    failures = []
    for name, argv, words in PROBES:
        argv = [a.format(**{k: str(v) for k, v in places.items()}) for a in argv]
        try:
            main(argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        except Exception as escaped:  # a traceback the user would see
            code = f"{type(escaped).__name__}: {escaped}"
        err = capsys.readouterr().err
        try:
            _one_error(code, err, words)
            assert _tree(tmp_path) == before, "the probe changed the folder"
        except AssertionError as failure:
            failures.append(f"{name}: {failure}")
            before = _tree(tmp_path)
    assert not failures, "\n".join(failures)


HELD = [
    ("lola", ["lola", "--inner", "exact", "--outer", "exact", "--seeds", "2", "--updates", "2",
              "--horizon", "5", "--no-progress", "--out", "{held}"]),
    ("mgrl", ["mgrl", "--env", "CartPole-v1", "--algo", "a2c", "--frames", "2000", "--seeds", "1",
              "--no-progress", "--out", "{held}"]),
    ("study-mgrl", ["study", "mgrl", "--quick", "--no-progress", "--out", "{held}"]),
    ("study-lola", ["study", "lola", "--seeds", "2", "--updates", "2", "--variants",
                    "inner-exact-outer-exact", "--no-progress", "--out", "{held}"]),
    ("study-decompose", ["study", "decompose", "--quick", "--mdps", "2", "--repeats", "3",
                         "--max-groups", "1", "--no-progress", "--out", "{held}"]),
]


@pytest.mark.parametrize("argv", [a for _, a in HELD], ids=[n for n, _ in HELD])
def test_a_folder_held_by_another_run_is_refused_untouched(tmp_path, capsys, argv):
    """Every command that writes a folder takes its lock first: a folder another gmrl process
    holds is refused before anything is written (`gmrl lola`, `gmrl mgrl` and `gmrl study mgrl`
    took no lock before; mutation: dropping `folder_run` from `gmrl lola` fails here)."""
    import fcntl

    held = tmp_path / "held"
    held.mkdir()
    with open(held / ".gmrl.lock", "a+") as handle:  # as another process would hold it
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = _tree(tmp_path)
        try:
            main([a.format(held=held) for a in argv])
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        _one_error(code, capsys.readouterr().err, ["in use by another gmrl run"])
        assert _tree(tmp_path) == before


FAILING_RUNS = [
    ("lola", "gmrl.runs.lola.run", HELD[0][1]),
    ("study-lola", "gmrl.runs.lola.run", HELD[3][1]),
    ("study-decompose", "gmrl.sweep.run_sweep", HELD[4][1]),
]


@pytest.mark.parametrize("target, argv", [(t, a) for _, t, a in FAILING_RUNS],
                         ids=[n for n, _, _ in FAILING_RUNS])
@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "empty-folder"])
def test_a_failing_run_holds_the_lock_and_leaves_the_folder_as_it_was(tmp_path, capsys,
                                                                      monkeypatch, target, argv,
                                                                      existing):
    """The run itself (replaced by a stand-in that fails) runs under the folder's lock, and
    its failure leaves the folder as before: removed if new, empty if it was empty (mutations:
    dropping `folder_run` from `gmrl lola` fails the lock check; a `folder_run` that keeps its
    files on failure leaves config.json)."""
    import importlib

    from gmrl.errors import InputError
    from gmrl.io import lock_is_held

    out = tmp_path / "new" / "run"
    if existing:
        out.mkdir(parents=True)
    seen = {}

    def failing_run(*args, **kwargs):
        seen["locked"] = lock_is_held(out)
        seen["config"] = (out / "config.json").is_file()
        raise InputError("the stand-in run failed")

    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, failing_run)
    try:
        main([a.format(held=out) for a in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    _one_error(code, capsys.readouterr().err, ["the stand-in run failed"])
    assert seen == {"locked": True, "config": True}
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == (
        ["new", "new/run"] if existing else [])


def test_an_error_line_starts_below_a_progress_bar(capsys):
    """An error raised while a progress bar is drawn gets its own line (the bar is closed
    first; mutation: printing without closing the bars puts the line after the bar's text)."""
    from tqdm import tqdm

    from gmrl.cli import _say

    bar = tqdm(total=4, desc="study", file=sys.stderr, mininterval=0)
    bar.update(1)
    _say("gmrl: error: something broke")
    err = capsys.readouterr().err
    assert err.endswith("\ngmrl: error: something broke\n"), repr(err)


def _gmrl(*args, timeout: float):
    """`gmrl ARGS` in a fresh process with its address space capped at 24 GB (a broken guard
    fails there instead of filling the machine's memory)."""
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (24 * 2**30, 24 * 2**30))\n"
            "from gmrl.cli import main\n"
            "sys.argv[0] = 'gmrl'\n"
            "main(sys.argv[1:])\n")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("argv, option", [
    (["lola", "--seeds", "100000000"], "--seeds"),
    (["check", "{in}/user.py:fine", "--mdps", "100000000"], "--mdps"),
], ids=["lola-seeds", "check-mdps"])
def test_huge_sizes_exit_2_within_5_seconds(tmp_path, argv, option):
    places = _inputs(tmp_path)
    before = _tree(tmp_path)
    argv = [a.format(**{k: str(v) for k, v in places.items()}) for a in argv]
    started = time.perf_counter()
    done = _gmrl(*argv, "--out", places["new"] if argv[0] == "lola" else places["new"] / "x.json",
                 timeout=60)
    seconds = time.perf_counter() - started
    _one_error(done.returncode, done.stderr, [option, "at most"])
    assert _tree(tmp_path) == before
    assert seconds < 5, seconds  # refused before JAX starts: about 1-2 s


def test_ctrl_c_in_the_first_block_is_one_line_and_leaves_no_folder(tmp_path):
    """SIGINT while `gmrl lola` compiles its first block: exit 130, one line that says nothing is
    kept, and the new folder (and its new parent) removed."""
    out = tmp_path / "new" / "run"
    process = subprocess.Popen(
        [sys.executable, "-c", "from gmrl.cli import main; main()", "lola", "--seeds", "2",
         "--updates", "4", "--inner", "8", "--outer", "8", "--horizon", "20", "--no-progress",
         "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / "config.json").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    lines = err.strip().splitlines()
    assert process.returncode == 130, err
    assert len(lines) == 1 and lines[0].startswith("gmrl: "), err
    assert "nothing to resume" in lines[0] and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))


def test_summary_json_is_strict_with_reasons(tmp_path):
    """summary.json-style files hold null (with the reason in "nulls"), never a bare NaN."""
    from gmrl.io import atomic_write_json

    path = atomic_write_json(tmp_path / "s.json", {"a": float("nan"), "b": [1.0, float("inf")],
                                                   "c": {"d": float("-inf")}}, {"a": "no replay"})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["a"] is None and data["b"] == [1.0, None] and data["c"]["d"] is None
    assert data["nulls"]["a"] == "no replay" and set(data["nulls"]) == {"a", "b[1]", "c.d"}
