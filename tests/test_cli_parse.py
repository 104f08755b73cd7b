"""The strict command-line layer (dense_lora.cli): every argument is checked before anything loads.

In-process tests pin the reading of each spelling; subprocess tests run the CLIs as users call them and check
that bad arguments fail with one line, exit status 2 and nothing written, before torch (or any other heavy
library) is imported: that is what makes a typo fail in a fraction of a second, checked on a machine of any speed.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dense_lora import cli
from dense_lora.evaluate import run as evaluate_run
from dense_lora.params import main as params_main
from dense_lora.train import TrainConfig, config_from_flags

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
# The libraries a CLI must not import before its arguments are checked (each costs seconds of CPU to import).
HEAVY = ("torch", "numpy", "transformers", "peft", "datasets", "accelerate")
# `python -c` this, then the script and its arguments: runs the script as `python SCRIPT ARGS` does and, at exit,
# writes the HEAVY libraries it imported to $IMPORTED_FILE (space-separated).
RUN_LISTING_IMPORTS = f"""
import atexit, os, runpy, sys
def record():
    with open(os.environ["IMPORTED_FILE"], "w") as file:
        file.write(" ".join(name for name in {HEAVY!r} if name in sys.modules))
atexit.register(record)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def train_parse(*argv: str) -> dict:
    return cli.parse(list(argv), cli.train_flags(), "finetune.py")


# --- the flags are the code's definitions, each with a meaning ----------------------------------------------


def test_flags_are_the_fields_and_parameters_each_with_a_meaning():
    fields = dataclasses.fields(TrainConfig)
    assert [flag.name for flag in cli.train_flags()] == [field.name for field in fields]
    assert [flag.default for flag in cli.train_flags() if flag.name == "lora_r"] == ["32"]
    parameters = list(inspect.signature(evaluate_run).parameters)[1:]
    assert [flag.name for flag in cli.eval_flags()] == parameters
    assert [flag.name for flag in cli.eval_flags() if flag.required] == ["dataset", "base_model"]
    assert [flag.name for flag in cli.params_flags()] == list(inspect.signature(params_main).parameters)
    for flags, helps in (
        (cli.train_flags(), cli.TRAIN_HELP),
        (cli.eval_flags(), cli.EVAL_HELP),
        (cli.params_flags(), cli.PARAMS_HELP),
    ):
        assert {flag.name for flag in flags} == set(helps), "every flag needs a one-line meaning, none stale"
        assert all(flag.help and "\n" not in flag.help for flag in flags)


# --- spellings that keep working -----------------------------------------------------------------------------


def test_current_spellings_keep_their_meaning():
    values = train_parse(
        "--base_model", "smollm2", "--lora_r=8", "--learning-rate", "1e-4", "--bf16",
        "--train_on_inputs", "False", "--group_by_length=true", "--noload_best_model_at_end",
        "--max_steps", "-1", "--num_epochs", "2", "--lora_alpha", "None", "--resume_from_checkpoint",
    )  # fmt: skip
    assert values == {
        "base_model": "smollm2",
        "lora_r": 8,
        "learning_rate": 1e-4,
        "bf16": True,
        "train_on_inputs": False,
        "group_by_length": True,
        "load_best_model_at_end": False,
        "max_steps": -1,
        "num_epochs": 2,  # an int, as fire read it: saved run configs compare equal
        "lora_alpha": None,
        "resume_from_checkpoint": True,
    }
    assert isinstance(values["num_epochs"], int)
    assert train_parse("--resume_from_checkpoint", "runs/x/checkpoint-80")["resume_from_checkpoint"] == (
        "runs/x/checkpoint-80"
    )


@pytest.mark.parametrize(
    "words",
    [
        ("q_proj,v_proj",),
        ("q_proj", "v_proj"),
        ('["q_proj","v_proj"]',),
        ('["q_proj",', '"v_proj"]'),
        ("q_proj,", "v_proj"),
    ],
)
def test_every_list_spelling_is_the_same_list(words):
    """`--target_modules q_proj v_proj` trained q_proj alone under fire; now it is deliberately the list."""
    values = train_parse("--base_model", "x", "--target_modules", *words, "--lora_r", "4")
    assert values["target_modules"] == ["q_proj", "v_proj"] and values["lora_r"] == 4
    assert config_from_flags(values).target_modules == ["q_proj", "v_proj"]


def test_int_lists_and_dataset_lists():
    assert cli.parse(["--r", "8,16", "--model", "m"], cli.params_flags(), "p")["r"] == [8, 16]
    values = cli.parse(["--dataset", "boolq", "piqa", "--base_model", "b"], cli.eval_flags(), "e")
    assert values == {"dataset": ["boolq", "piqa"], "base_model": "b"}


# --- everything else is refused, in one line ---------------------------------------------------------------

REFUSED = [
    (("--base_model", "x", "--batchsize", "4"), "unknown flag --batchsize; did you mean --batch_size?"),
    (("--base_model", "x", "--lora-rr", "4"), "unknown flag --lora-rr; did you mean --lora_r?"),
    (("--base_model", "x", "--zzz", "4"), "unknown flag --zzz (see finetune.py --help)"),
    (("x", "--base_model", "x"), "unexpected argument 'x': every argument is a --flag"),
    (
        ("--base_model", "x", "--lora_r", "8", "16"),
        "unexpected argument '16' after '8': --lora_r takes one value",
    ),
    (("--base_model", "x", "--lora_r", "eight"), "--lora_r takes an integer, got 'eight'"),
    (("--base_model", "x", "--lora_r", "8.5"), "--lora_r takes an integer, got '8.5'"),
    (("--base_model", "x", "--learning_rate", "fast"), "--learning_rate takes a number, got 'fast'"),
    (("--base_model", "x", "--learning_rate", "nan"), "--learning_rate takes a finite number"),
    (("--base_model", "x", "--bf16", "maybe"), "--bf16 takes true or false, got 'maybe'"),
    (("--base_model", "x", "--lora_r"), "--lora_r needs a value"),
    (("--base_model", "x", "--lora_r", "8", "--lora_r", "9"), "--lora_r is given twice"),
    (("--base_model", "x", "--target_modules", "[q_proj"), "--target_modules is not a valid JSON list"),
    (("--base_model", "x", "--target_modules", ","), "--target_modules names nothing"),
    (("--base_model", "x", "-r", "8"), "unknown flag -r"),
]


@pytest.mark.parametrize(("argv", "message"), REFUSED)
def test_bad_arguments_are_refused(argv, message):
    with pytest.raises(cli.UsageError) as caught:
        train_parse(*argv)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_required_flags():
    with pytest.raises(cli.UsageError, match="--dataset, --base_model is required"):
        cli.parse([], cli.eval_flags(), "commonsense_evaluate.py")


# --- as users call them: subprocesses -----------------------------------------------------------------------


def run_cli(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600
    )


def run_script_listing_imports(
    script: str, *argv: str, tmp_path: Path
) -> tuple[subprocess.CompletedProcess, list[str] | None]:
    """Run a top-level script as users do; also return the HEAVY libraries it had imported when it exited (None
    when it died before its exit handlers ran: its status and stderr say how)."""
    imported = tmp_path / "imported.txt"
    done = subprocess.run(
        [sys.executable, "-c", RUN_LISTING_IMPORTS, script, *argv],
        capture_output=True,
        text=True,
        env={**ENV, "IMPORTED_FILE": str(imported)},
        cwd=REPO,
        timeout=600,
    )
    return done, imported.read_text().split() if imported.exists() else None


@pytest.mark.parametrize(
    ("script", "argv", "message"),
    [
        ("finetune.py", ("--base_model", "smollm2", "--output_dir", "{out}", "--target_modules", "q_proj", "v_proj",
                         "--lora_r", "8", "4"), "unexpected argument '4' after '8'"),
        ("finetune.py", ("--base_model", "smollm2", "--output_dir", "{out}", "--lora_rank", "8"),
         "did you mean --lora_r?"),
        ("commonsense_evaluate.py", ("--dataset", "boolq", "--base_model", "smollm2", "--output_dir", "{out}",
                                     "--batchsize", "4"), "unknown flag --batchsize; did you mean --batch_size?"),
        ("math_evaluate.py", ("--dataset", "gsm8k", "--base_model", "smollm2", "--output_dir", "{out}", "extra"),
         "unexpected argument 'extra' after '{out}'"),
        ("math_evaluate.py", ("--dataset", "gsm8k", "--output_dir", "{out}"), "--base_model is required"),
    ],
)  # fmt: skip
def test_bad_arguments_fail_before_anything_loads(script, argv, message, tmp_path):
    out = tmp_path / "out"
    done, imported = run_script_listing_imports(
        script, *(word.format(out=out) for word in argv), tmp_path=tmp_path
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [f"error: {message.format(out=out)}"] or (
        len(done.stderr.splitlines()) == 1 and message.format(out=out) in done.stderr
    ), done.stderr
    assert imported == [], "the arguments must be checked before these libraries load"
    assert not out.exists()


@pytest.mark.parametrize("script", ["finetune.py", "commonsense_evaluate.py", "math_evaluate.py"])
def test_help_gives_every_flag_a_meaning(script, tmp_path):
    done, imported = run_script_listing_imports(script, "--help", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert imported == [], "--help must not load these libraries"
    flags = cli.train_flags() if script == "finetune.py" else cli.eval_flags()
    lines = done.stdout.splitlines()
    for flag in flags:
        (line,) = [line for line in lines if line.strip().startswith(f"--{flag.name} ")]
        assert flag.help in line and ("required" in line or f"default: {flag.default}" in line)


def error_lines(stderr: str) -> list[str]:
    """stderr without bitsandbytes' import-time kernels notice, which `python -m dense_lora.X` cannot silence
    before dense_lora/__init__ imports peft (the top-level scripts do silence it)."""
    return [line for line in stderr.strip().splitlines() if "gemm_4bit_forward" not in line]


@pytest.mark.slow
def test_params_and_bench_refuse_bad_flags(tmp_path):
    done = run_cli("-m", "dense_lora.params", "--model", "llama3-8b", "--target_module", "q_proj")
    assert done.returncode == 2
    assert error_lines(done.stderr) == [
        "error: unknown flag --target_module; did you mean --target_modules? (see python -m dense_lora.params --help)"
    ]
    done = run_cli("-m", "dense_lora.params", "--model", "llama9-1b")
    assert done.returncode == 2
    (line,) = error_lines(done.stderr)
    assert line.startswith("error: unknown architecture 'llama9-1b': use one of llama3-8b, llama2-7b")
    done = run_cli(str(REPO / "bench" / "eval_throughput.py"), "--per_datset", "4", cwd=tmp_path)
    assert done.returncode == 2
    assert error_lines(done.stderr) == [
        "error: unknown flag --per_datset; did you mean --per_dataset? (see bench/eval_throughput.py --help)"
    ]
