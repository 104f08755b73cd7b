"""`pip install .` into a fresh virtual environment gives working console scripts (issue 12.2).

The venv sees the system's packages (torch, transformers, peft are installed there) and the install runs with
--no-deps --no-build-isolation --no-index, so nothing is downloaded; what is tested is the package itself: its modules,
subpackages, package data and entry points, imported from site-packages, not from this checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = (
    "denselora-finetune",
    "denselora-eval-commonsense",
    "denselora-eval-math",
    "denselora-report",
    "denselora-params",
)


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pkg")
    source = root / "source"  # a copy, so the build leaves no build/ or egg-info in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "dense_lora", source / "dense_lora", ignore=shutil.ignore_patterns("__pycache__"))
    env_dir = root / "venv"
    # --without-pip: the system's pip and setuptools (seen through --system-site-packages) install into the venv;
    # ensurepip's bundled setuptools 65 could not build a wheel without the `wheel` package.
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env_dir)], check=True
    )
    install = subprocess.run(
        [
            str(env_dir / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PIP_NO_INDEX": "1"},
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return env_dir


def run_script(venv: Path, name: str, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(
        [str(venv / "bin" / name), *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


@pytest.mark.slow
def test_installed_package_has_scripts_subpackages_and_data(venv, tmp_path):
    for name in SCRIPTS:
        assert (venv / "bin" / name).is_file(), name
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import dense_lora, dense_lora.study, dense_lora.paper, pathlib; "
         "print(dense_lora.__file__); print(sorted(p.name for p in pathlib.Path(dense_lora.paper.__file__).parent.iterdir()))"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
        env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"},
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-2000:]
    location, data = probe.stdout.strip().splitlines()[-2:]
    assert str(venv) in location and str(REPO) not in location  # the installed copy, not the checkout
    assert "results.json" in data and "NOTES.md" in data


@pytest.mark.slow
def test_console_scripts_help_and_bad_flags(venv, tmp_path):
    shown = run_script(venv, "denselora-finetune", "--help", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "usage: denselora-finetune" in shown.stdout
    assert "--lora_r INT" in shown.stdout and "--target_modules" in shown.stdout
    refused = run_script(venv, "denselora-eval-commonsense", "--dataset", "boolq", "--base_model", "x",
                         "--batchsize", "4", cwd=tmp_path)  # fmt: skip
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: unknown flag --batchsize; did you mean --batch_size? (see denselora-eval-commonsense --help)"
    )
    assert list(tmp_path.iterdir()) == []  # nothing written
    counted = run_script(venv, "denselora-params", "--model", "llama2-7b", "--r", "16", cwd=tmp_path)
    assert counted.returncode == 0 and "917,504" in counted.stdout
