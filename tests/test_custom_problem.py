"""docs/examples/custom_problem.py: a user's own GMRL problem on the public core API runs as a script."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "examples" / "custom_problem.py"


def test_custom_problem_example_prints_its_table():
    done = subprocess.run([sys.executable, str(SCRIPT), "8"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    assert {r[0] for r in rows} == {"dice", "loaded", "lvc", "maml"} and len(rows) == 16
    assert all(abs(float(r[2])) <= 1 for r in rows)  # corr is a correlation
