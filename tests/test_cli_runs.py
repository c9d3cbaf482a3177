"""The `gmrl` command line itself: lazy imports, and clean failures of the LOLA/MGRL commands.

Every failure case runs the installed `gmrl` entry point in a subprocess and checks exit status 2,
one line `gmrl: error: …` on stderr, no traceback and no file left behind (issue 12, cases 8, 9,
10, 13 and 4's atomic figures).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

HEAVY = ("gymnax", "flax", "ray", "optax", "tensorboardX")


def _gmrl() -> list[str]:
    script = Path(sys.executable).parent / "gmrl"
    if script.exists():
        return [str(script)]
    found = shutil.which("gmrl")
    return [found] if found else [sys.executable, "-c", "from gmrl.cli import main; main()"]


def run_gmrl(*args, umask: int | None = None, timeout: float = 300):
    # subprocess's own umask argument: no preexec_fn, so no os.fork() of this (JAX) process
    return subprocess.run(_gmrl() + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, umask=-1 if umask is None else umask)


def assert_clean_error(done, *words):
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gmrl: error: "), done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("argv", [["--help"], ["tabular", "--help"]])
def test_help_is_fast_and_imports_no_rl_or_ray_package(argv):
    code = ("import sys, time\n"
            "from gmrl.cli import main\n"
            "start = time.perf_counter()\n"
            "try:\n"
            f"    main({argv!r})\n"
            "except SystemExit:\n"
            "    pass\n"
            "print('SECONDS', time.perf_counter() - start)\n"
            f"print('LOADED', [m for m in {HEAVY!r} if m in sys.modules])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stdout, done.stdout
    # CPU seconds of the real command (wall time on the shared 2-core machine is mostly waiting)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    shown = run_gmrl(*argv)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert shown.returncode == 0 and "Usage: gmrl" in shown.stdout
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 2.0, cpu


def test_study_names_do_not_need_imports_to_resolve():
    from gmrl import cli

    assert set(cli.LAZY_COMMANDS) <= {"tabular", "lola", "mgrl", "mgrl-bias", "plot", "check"}
    listed = [n for n, (m, _) in cli.LAZY_COMMANDS.items() if m in cli.COMMAND_MODULES]
    assert {"tabular", "lola", "mgrl", "plot"} <= set(listed)


LOLA_FAST = ["lola", "--inner", "exact", "--outer", "exact", "--seeds", "2", "--updates", "2",
             "--horizon", "5", "--cpu-devices", "1", "--no-progress"]
MGRL_FAST = ["mgrl", "--env", "CartPole-v1", "--algo", "a2c", "--frames", "2000", "--seeds", "1",
             "--no-progress"]


def _read_only_place(tmp_path: Path) -> Path:
    """A folder where nothing can be created: /proc for root (which ignores permissions)."""
    if os.geteuid() == 0:
        return Path("/proc/gmrl-no-such-place/run")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked / "run"


@pytest.mark.parametrize("command", ["lola", "study-lola", "mgrl"])
def test_out_that_is_a_file_or_read_only_is_refused_before_computing(tmp_path, command):
    argv = {"lola": LOLA_FAST, "mgrl": MGRL_FAST,
            "study-lola": ["study", "lola", "--variants", "inner-exact-outer-exact", "--seeds",
                           "2", "--updates", "2", "--cpu-devices", "1", "--no-progress"]}[command]
    existing = tmp_path / "file.json"
    existing.write_text("{}")
    for out, words in ((existing, ("existing file", "folder")),
                       (existing / "x", ("is a file, not a folder",)),
                       (_read_only_place(tmp_path), ("not a writable folder",))):
        tic = time.perf_counter()
        assert_clean_error(run_gmrl(*argv, "--out", out), "--out", *words)
        assert time.perf_counter() - tic < 60  # refused before any training
    assert existing.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == [
        "file.json"] + (["locked"] if os.geteuid() != 0 else [])


@pytest.mark.parametrize("option, allowed", [("--seeds", ">= 1"), ("--updates", ">= 1"),
                                             ("--chunk", ">= 1")])
def test_lola_bad_sizes_write_nothing(tmp_path, option, allowed):
    out = tmp_path / "D"
    argv = [a for a in LOLA_FAST]
    assert_clean_error(run_gmrl(*argv, option, "0", "--out", out), option, allowed)
    assert not out.exists()


def test_mgrl_study_bad_learning_rate_writes_nothing(tmp_path):
    out = tmp_path / "D"
    assert_clean_error(run_gmrl("study", "mgrl", "--quick", "--lr", "-1", "--no-progress",
                                "--out", out), "--lr must be >= 0")
    assert not out.exists()


def test_mgrl_resume_without_a_run_says_so(tmp_path):
    out = tmp_path / "nonexistent"
    assert_clean_error(run_gmrl(*MGRL_FAST, "--resume", "--out", out), "--resume",
                       "holds no run")
    assert not out.exists()


def test_lola_run_files_follow_the_umask_and_a_rerun_reuses_the_store(tmp_path):
    out = tmp_path / "run"
    done = run_gmrl(*LOLA_FAST, "--out", out, umask=0o027)
    assert done.returncode == 0, done.stderr
    names = {"config.json", "results.sqlite", "per_seed.csv", "curves.csv", "summary.json"}
    assert names <= {p.name for p in out.iterdir()}
    for name in names - {"results.sqlite"}:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o640, name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files
    key = json.loads((out / "config.json").read_text())["key"]
    again = run_gmrl(*LOLA_FAST, "--out", out)
    assert again.returncode == 0 and done.stdout == again.stdout  # the stored run, same numbers
    assert json.loads((out / "config.json").read_text())["key"] == key
    other = run_gmrl(*[a if a != "5" else "6" for a in LOLA_FAST], "--out", out)
    assert_clean_error(other, "other settings", "horizon: 5 -> 6")
    summary = (out / "summary.json").read_text()
    json.loads(summary, parse_constant=lambda c: pytest.fail(f"bare {c} in summary.json"))
    assert "nulls" in json.loads(summary)  # this on-policy variant has no replay statistics
    before = summary
    (out / "summary.json").unlink()
    redrawn = run_gmrl("plot", out)  # `gmrl plot` redraws a LOLA run's files from its store
    assert redrawn.returncode == 0, redrawn.stderr
    assert (out / "summary.json").read_text() == before


def test_atomic_writes_honour_the_umask(tmp_path):
    from gmrl import io

    previous = os.umask(0o002)
    try:
        io.atomic_write_text(tmp_path / "a.txt", "x")
        io.atomic_write_bytes(tmp_path / "b.bin", b"x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o664
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o664


def test_a_figure_that_fails_half_way_leaves_no_partial_png(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from gmrl.runs import lola as lola_runs

    def full_disk(self, handle, **kwargs):
        handle.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    lola_runs.plot_study(tmp_path, {"a": MINIMAL_LOLA_RESULT})
    before = (tmp_path / "joint_score.png").read_bytes()
    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.raises(OSError, match="No space"):
        lola_runs.plot_study(tmp_path, {"a": MINIMAL_LOLA_RESULT})
    assert (tmp_path / "joint_score.png").read_bytes() == before  # the old figure, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "correlation.png", "final_joint_score.png", "joint_score.png"]


MINIMAL_LOLA_RESULT = {
    "per_seed": {"score": [[[-1.5, -1.5], [-1.2, -1.2]]] * 2, "corr": [[[0.2, 0.2], [0.3, 0.3]]] * 2},
    "final_joint_score": -1.2, "final_joint_score_hw": 0.1, "per_seed_final_joint_score": [-1.2, -1.2],
    "final_window": 1, "config": {}}
"""Just what `gmrl.runs.lola.plot_study` reads of a stored LOLA result."""


def test_library_plotting_leaves_the_matplotlib_backend_alone(tmp_path):
    code = ("import matplotlib\nmatplotlib.use('svg')\n"
            "from gmrl.runs import lola\n"
            f"s = {MINIMAL_LOLA_RESULT!r}\n"
            f"lola.plot_study(__import__('pathlib').Path({str(tmp_path)!r}), {{'a': s}})\n"
            "print(matplotlib.get_backend())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={k: v for k, v in os.environ.items()
                                            if k != "MPLBACKEND"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().lower() == "svg"
    assert (tmp_path / "joint_score.png").read_bytes()[:4] == b"\x89PNG"
