"""The module CLIs (report, study, analysis) refuse bad flags the way every CLI here does: one line, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("module", "argv", "message"),
    [
        ("dense_lora.report", ["runs/x", "--ou", "r"], "did you mean --out?"),  # no abbreviations
        ("dense_lora.analysis", ["runs/x", "--modul", "q_proj"], "did you mean --module?"),
        ("dense_lora.study", ["--profile", "nope"], "invalid choice: 'nope'"),
        ("dense_lora.study", ["--devices", "gpu0"], "--devices must be 'cpu' or CUDA device numbers"),
        # the smoke profile sweeps learning rates on the commonsense mix, which a math-only study would not build
        ("dense_lora.study", ["--profile", "smoke", "--families", "math"], "add commonsense to --families"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(module, argv, message, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", module, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and "usage:" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written
