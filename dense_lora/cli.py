"""Strict command lines for finetune, the two evaluators, the parameter counter and the benchmarks.

Why this module exists: ``fire`` called the function first and complained about what it could not consume
afterwards, so ``--target_modules q_proj v_proj`` trained a whole run on ``q_proj`` and a typo such as
``--batchsize 4`` ran a full evaluation before exiting 2. Here every argument is checked before anything is
imported or loaded: unknown or misspelt flags (with the closest known one suggested), stray positional
words, a value given twice, values of the wrong type, required flags. Bad input is one ``error:`` line on
stderr and exit status 2, with nothing written.

The flags are not written down twice: they are read from the definitions the code already has
(``dense_lora.train.TrainConfig``'s fields, ``dense_lora.evaluate.run``'s parameters, ...) with :mod:`ast`,
statically. That is also why this module imports nothing beyond the standard library at module level:
``dense_lora/__init__`` imports torch and peft (over 10 s of CPU, minutes on a loaded machine), and the
top-level scripts load this file by path so that a typo fails in a fraction of a second. Each entry point
imports the heavy modules only after its arguments parsed.

Accepted spellings (those fire accepted, so existing commands keep working): ``--flag value``,
``--flag=value``, ``--flag-name`` for ``--flag_name``, booleans ``True/False/true/false/yes/no/1/0``, a bare
``--flag`` for true and ``--noflag`` for false, ``None`` for optional values, and for list flags a comma list
(``q_proj,v_proj``), a JSON list (``'["q_proj","v_proj"]'``) or several words (``q_proj v_proj``), all
meaning the same list.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import logging
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

PACKAGE_DIR = Path(__file__).resolve().parent
USAGE_EXIT_CODE = 2

# How a parameter's annotation (as written in the source) is read from the command line.
KINDS: dict[str, str] = {
    "str": "str",
    "str | None": "str",
    "int": "int",
    "int | None": "int",
    "float": "float",
    "float | None": "float",
    "bool": "bool",
    "str | bool | None": "str_or_bool",
    "Sequence[str] | str | None": "list",
    "str | Sequence[str]": "list",
    "int | str | Sequence[int]": "int_list",
}
METAVARS = {
    "str": "TEXT",
    "int": "INT",
    "float": "NUMBER",
    "bool": "[BOOL]",
    "str_or_bool": "PATH|BOOL",
    "list": "A,B,...",
    "int_list": "N,M,...",
}
TRUE_WORDS = ("true", "yes", "1")
FALSE_WORDS = ("false", "no", "0")
NONE_WORDS = ("none", "null")


class UsageError(Exception):
    """A command line that cannot be run as given; printed as one ``error:`` line, exit status 2.

    The CLIs load this module by path to check their flags before torch is imported, so it cannot import
    the package (and its runtime.DenseLoRAError); it is the one error type of the parsing stage.
    """

    def __init__(self, message: object) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class Flag:
    """One command-line flag: its name, how its value is read, its default (for --help) and its meaning."""

    name: str
    kind: str
    help: str
    default: str = ""  # as shown by --help; empty means required
    required: bool = False
    optional: bool = False  # accepts None


# --------------------------------------------------------------------------------------------------
# Reading the flags from the code, statically
# --------------------------------------------------------------------------------------------------


def _default_text(node: ast.expr | None) -> str:
    if node is None:
        return ""
    try:
        value = ast.literal_eval(node)
    except ValueError:
        return ast.unparse(node)
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    return str(value)


def _flag(name: str, annotation: ast.expr | None, default: ast.expr | None, helps: Mapping[str, str]) -> Flag:
    written = ast.unparse(annotation) if annotation is not None else "str"
    if written not in KINDS:
        raise TypeError(
            f"flag --{name}: annotation {written!r} has no command-line reading in dense_lora.cli.KINDS"
        )
    return Flag(
        name=name,
        kind=KINDS[written],
        help=helps.get(name, ""),
        default=_default_text(default),
        required=default is None,
        optional=written.endswith("None"),
    )


def _module_tree(module: str) -> ast.Module:
    return ast.parse((PACKAGE_DIR / f"{module}.py").read_text())


def dataclass_flags(module: str, class_name: str, helps: Mapping[str, str]) -> list[Flag]:
    """One flag per field of a dataclass in ``dense_lora/<module>.py``, without importing it."""
    for node in _module_tree(module).body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return [
                _flag(item.target.id, item.annotation, item.value, helps)
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            ]
    raise LookupError(f"no class {class_name} in dense_lora/{module}.py")


def signature_flags(
    module: str, function: str, helps: Mapping[str, str], skip: Sequence[str] = ()
) -> list[Flag]:
    """One flag per parameter of a function in ``dense_lora/<module>.py`` (or a path), without importing it."""
    tree = ast.parse(Path(module).read_text()) if module.endswith(".py") else _module_tree(module)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            args = node.args.args
            defaults: list[ast.expr | None] = [None] * (len(args) - len(node.args.defaults))
            defaults += list(node.args.defaults)
            return [
                _flag(arg.arg, arg.annotation, default, helps)
                for arg, default in zip(args, defaults, strict=True)
                if arg.arg not in skip
            ]
    raise LookupError(f"no function {function} in {module}")


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_flag_token(token: str) -> bool:
    """``--x`` and ``-x`` are flags; ``-1`` and ``-0.5`` are values (``--max_steps -1``)."""
    return token.startswith("-") and len(token) > 1 and not _is_number(token)


def _bool(flag: Flag, text: str) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise UsageError(f"--{flag.name} takes true or false, got {text!r}")


def _items(flag: Flag, words: Sequence[str]) -> list[str]:
    """A list flag's items from a comma list, a JSON list or several words (all the same list)."""
    text = " ".join(words).strip() if words and words[0].lstrip().startswith("[") else ",".join(words)
    if text.startswith("["):
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError:
            raise UsageError(f"--{flag.name} is not a valid JSON list: {text}") from None
        if not isinstance(loaded, list) or not all(isinstance(item, str | int) for item in loaded):
            raise UsageError(f"--{flag.name} must be a list of names, got {text}")
        parts = [str(item).strip() for item in loaded]
    else:
        parts = [part.strip() for part in text.split(",")]
    items = [part for part in parts if part]
    if not items:
        raise UsageError(f"--{flag.name} names nothing")
    return items


def convert(flag: Flag, words: Sequence[str]) -> Any:
    """The typed value of a flag from the words that followed it (already checked for count)."""
    if flag.kind in ("list", "int_list"):
        items = _items(flag, words)
        if flag.kind == "list":
            return items
        try:
            return [int(item) for item in items]
        except ValueError:
            raise UsageError(f"--{flag.name} takes integers, got {','.join(items)!r}") from None
    (text,) = words
    if flag.optional and text.strip().lower() in NONE_WORDS:
        return None
    if flag.kind == "bool":
        return _bool(flag, text)
    if flag.kind == "str_or_bool":
        word = text.strip().lower()
        return _bool(flag, text) if word in TRUE_WORDS + FALSE_WORDS else text
    if flag.kind == "int":
        try:
            return int(text)
        except ValueError:
            raise UsageError(f"--{flag.name} takes an integer, got {text!r}") from None
    if flag.kind == "float":
        try:
            return int(text)  # "3" stays 3, as fire read it, so saved run configs compare equal
        except ValueError:
            pass
        try:
            value = float(text)
        except ValueError:
            raise UsageError(f"--{flag.name} takes a number, got {text!r}") from None
        if not math.isfinite(value):
            raise UsageError(f"--{flag.name} takes a finite number, got {text!r}")
        return value
    if not text.strip():
        raise UsageError(f"--{flag.name} is empty")
    return text


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"; did you mean --{close[0]}?" if close else ""


def parse(argv: Sequence[str], flags: Sequence[Flag], prog: str) -> dict[str, Any]:
    """Flags given on the command line, typed; raises UsageError on anything it cannot read exactly.

    Only the flags the user gave are returned: defaults stay where the code defines them.
    """
    by_name = {flag.name: flag for flag in flags}
    values: dict[str, Any] = {}
    index = 0
    while index < len(argv):
        token = argv[index]
        if not _is_flag_token(token):
            raise UsageError(
                f"unexpected argument {token!r}: every argument is a --flag (see {prog} --help)"
                if index == 0
                else f"unexpected argument {token!r} after {argv[index - 1]!r}: --{_previous(argv, index)} "
                "takes one value (lists are written a,b,c)"
            )
        name, has_value, inline = token.lstrip("-").partition("=")
        name = name.replace("-", "_")
        negated = False
        if name not in by_name and name.startswith("no"):
            stem = name[2:].lstrip("_")
            if by_name.get(stem) is not None and by_name[stem].kind == "bool" and not has_value:
                name, negated = stem, True
        flag = by_name.get(name)
        if flag is None or not token.startswith("--"):
            raise UsageError(
                f"unknown flag {token.partition('=')[0]}{_suggest(name, list(by_name))} (see {prog} --help)"
            )
        if name in values:
            raise UsageError(f"--{name} is given twice")
        index += 1
        words = [inline] if has_value else []
        if flag.kind in (
            "list",
            "int_list",
        ):  # deliberate: `--target_modules q_proj v_proj` is the list q_proj, v_proj
            while index < len(argv) and not _is_flag_token(argv[index]):
                words.append(argv[index])
                index += 1
        elif not has_value and index < len(argv) and not _is_flag_token(argv[index]):
            words.append(argv[index])  # a bool's word too: `--bf16 maybe` is an error, not a bare --bf16
            index += 1
        if negated:
            values[name] = False
        elif not words:
            if flag.kind not in ("bool", "str_or_bool"):
                raise UsageError(f"--{name} needs a value")
            values[name] = True
        else:
            values[name] = convert(flag, words)
    missing = [flag.name for flag in flags if flag.required and flag.name not in values]
    if missing:
        raise UsageError(f"{', '.join('--' + name for name in missing)} is required (see {prog} --help)")
    return values


def _previous(argv: Sequence[str], index: int) -> str:
    for token in reversed(argv[:index]):
        if _is_flag_token(token):
            return token.lstrip("-").partition("=")[0]
    return "?"


def help_text(prog: str, description: str, flags: Sequence[Flag]) -> str:
    """``--help``: one line per flag with its value type, meaning and default."""
    width = max(len(f"--{flag.name} {METAVARS[flag.kind]}") for flag in flags)
    lines = [f"usage: {prog} --flag VALUE ...", "", description.strip(), "", "flags:"]
    for flag in flags:
        left = f"--{flag.name} {METAVARS[flag.kind]}"
        default = "required" if flag.required else f"default: {flag.default}"
        lines.append(f"  {left:<{width}}  {flag.help or '(undocumented)'} [{default}]")
    lines += [
        "",
        'Booleans: --flag, --flag true|false or --noflag. Lists: a,b or \'["a","b"]\' or a b. '
        "Bad input: one error line on stderr, exit status 2, nothing written.",
    ]
    return "\n".join(lines)


def parse_or_exit(
    argv: Sequence[str] | None, flags: Sequence[Flag], prog: str, description: str
) -> dict[str, Any]:
    """parse() for an entry point: --help prints and exits 0; bad input prints one line and exits 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(args):
        print(help_text(prog, description, flags))
        raise SystemExit(0)
    try:
        return parse(args, flags, prog)
    except UsageError as error:
        fail(error)


def fail(error: object) -> NoReturn:
    """Print the one-line error (the first line of a longer message) and exit with status 2."""
    text = str(error).strip()
    print(f"error: {text.splitlines()[0] if text else type(error).__name__}", file=sys.stderr)
    raise SystemExit(USAGE_EXIT_CODE)


def quiet_optional_kernel_warning() -> None:
    """Silence bitsandbytes' import-time 'Failed to load CPU gemm_4bit_forward from kernels-community' line.

    It is printed on every CPU with AVX512-BF16 when the optional ``kernels`` package is missing; that kernel
    serves a 4-bit inference path dense_lora.models turns off, so on every run the line is noise.
    """
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


# --------------------------------------------------------------------------------------------------
# Meanings of the flags (--help); the flags themselves come from the code
# --------------------------------------------------------------------------------------------------

TRAIN_HELP: dict[str, str] = {
    "base_model": "base model: a local HF folder, a hub id or an alias (smollm2, llama2-7b, llama3-8b)",
    "data_path": "training data, LLM-Adapters JSON or JSONL; relative paths go through the data resolver",
    "output_dir": "run folder: adapter, checkpoints, metrics.jsonl, summary.json (one run per folder)",
    "method": "adapter method: denselora, lora, dora or vera",
    "adapter_name": "deprecated spelling of --method",
    "batch_size": "global batch size (micro batch x processes x gradient accumulation)",
    "micro_batch_size": "examples per forward pass on each process",
    "num_epochs": "passes over the training data (ignored when --max_steps is set)",
    "max_steps": "optimizer steps; -1 means use --num_epochs",
    "learning_rate": "AdamW peak learning rate",
    "weight_decay": "AdamW weight decay",
    "warmup_steps": "linear warm-up steps before the linear decay",
    "cutoff_len": "truncation length in tokens",
    "val_set_size": "records held out for validation loss (seeded); 0 disables evaluation",
    "eval_step": "optimizer steps between validation-loss evaluations",
    "save_step": "optimizer steps between checkpoints (a multiple of --eval_step to keep the best)",
    "save_total_limit": "checkpoints kept on disk (the best one is never deleted)",
    "logging_steps": "optimizer steps between lines of metrics.jsonl",
    "load_best_model_at_end": "final adapter = the checkpoint with the lowest validation loss",
    "train_on_inputs": "false masks the prompt out of the loss (answers only)",
    "group_by_length": "sample batches of similar length",
    "padding_side": "tokenizer padding side in training: right, or left as LLM-Adapters did (left: padded batches)",
    "data_fraction": "seeded share of the data to train on (Table 7), in (0, 1]",
    "seed": "seed of the split, subset, data order and adapter initialisation",
    "lora_r": "adapter rank r (a warning is printed when the adapter would exceed 50% of the base)",
    "lora_alpha": "scaling numerator alpha; default 2r",
    "lora_dropout": "dropout on the adapter input, in [0, 1)",
    "target_modules": "modules to adapt: q_proj,k_proj,... (comma list, JSON list or several words)",
    "activation": "DenseLoRA only: gelu, identity (Only Matrix), relu, silu or tanh",
    "train_shared": "DenseLoRA only: false freezes the shared encoder/decoder (Freeze)",
    "lora_modules": "DenseLoRA only: targeted modules that get plain per-layer LoRA instead",
    "bf16": "bfloat16 mixed precision (base loaded in bfloat16)",
    "fp16": "float16 mixed precision; needs a CUDA GPU (refused on CPU)",
    "load_8bit": "bitsandbytes 8-bit base model",
    "load_4bit": "bitsandbytes 4-bit NF4 base model",
    "use_gradient_checkpointing": "recompute activations in backward to save memory",
    "torch_compile": "torch.compile the model: minutes of compiling first; slower than eager on CPU (docs/training.md)",
    "packing": "padding-free batches: a micro-batch's records in one row, per-record positions (false: padded)",
    "trust_remote_code": "allow model code from the hub (off: never run downloaded code)",
    "resume_from_checkpoint": "a checkpoint folder, or true for the newest in --output_dir (a rerun resumes by itself)",
    "overwrite": "delete everything a previous run left in --output_dir (adapter, checkpoints, eval/) first",
    "wandb_project": "log to this Weights & Biases project (needs wandb)",
}

EVAL_HELP: dict[str, str] = {
    "dataset": "benchmark name, comma list, or all",
    "base_model": "base model: a local folder, a hub id or an alias (smollm2, llama2-7b, llama3-8b)",
    "lora_weights": "peft adapter folder (DenseLoRA, LoRA, DoRA, VeRA); none evaluates the bare base",
    "batch_size": "prompts per batch; default: largest that fits on GPU, 16 on CPU; 1 is the published protocol",
    "load_8bit": "bitsandbytes 8-bit base model",
    "load_4bit": "bitsandbytes 4-bit NF4 base model",
    "dtype": "auto (checkpoint dtype on GPU, float32 on CPU), bfloat16, float16 or float32",
    "num_beams": "beam count; 4 reproduces the published protocol (forces batch size 1)",
    "max_new_tokens": "generated-token budget; default 128",
    "limit": "evaluate only the first N examples of each benchmark",
    "extraction": "answer extraction: llm-adapters, strict, or both",
    "output_dir": "results folder; default <lora_weights>/eval",
    "overwrite": "replace results of a different config instead of refusing",
    "seed": "torch seed (decoding is deterministic)",
    "early_stop": "stop a row once its answer can no longer change (false decodes to the end)",
    "trust_remote_code": "allow model code from the hub (off: never run downloaded code)",
}

PARAMS_HELP: dict[str, str] = {
    "model": "architecture: llama2-7b, llama3-8b, smollm2 (or a published name) or a config.json / its folder",
    "r": "ranks to count, comma list",
    "target_modules": "modules adapted, comma list",
}

QUICKSTART_HELP: dict[str, str] = {
    "output_dir": "folder for the training subset, the adapter and both evaluations",
    "train_per_dataset": "training records taken from each of ARC-Easy and ARC-Challenge",
    "eval_limit": "test examples scored per dataset, before and after",
    "eval_batch_size": "evaluation batch size",
    "max_new_tokens": "generated-token budget per answer; default 128 (the paper's setting)",
    "lora_r": "DenseLoRA rank",
    "learning_rate": "AdamW peak learning rate",
    "num_epochs": "passes over the training subset",
}


def train_flags() -> list[Flag]:
    """finetune.py's flags: the fields of TrainConfig (dense_lora/training/config.py; dense_lora.train re-exports it)."""
    return dataclass_flags("training/config", "TrainConfig", TRAIN_HELP)


def eval_flags() -> list[Flag]:
    """The evaluators' flags: dense_lora.evaluate.run()'s parameters after `kind`."""
    return signature_flags("evaluation/run", "run", EVAL_HELP, skip=("kind",))


def params_flags() -> list[Flag]:
    """python -m dense_lora.params: the parameters of dense_lora.params.main()."""
    return signature_flags("params", "main", PARAMS_HELP)


# --------------------------------------------------------------------------------------------------
# Entry points (console scripts and the top-level scripts)
# --------------------------------------------------------------------------------------------------

FINETUNE_DESCRIPTION = """Fine-tune DenseLoRA (or the LoRA / DoRA / VeRA baselines) with the LLM-Adapters recipe.

  finetune.py --base_model smollm2 --data_path dataset/boolq/train.json --output_dir out/boolq
  torchrun --nproc_per_node 2 finetune.py ...     # DDP: --batch_size stays the global batch

Exit status: 0 done, 2 bad input (one line on stderr, nothing written), 75 stopped by SIGTERM after saving a
checkpoint (rerun the same command to resume). docs/training.md explains each flag."""


def finetune(argv: Sequence[str] | None = None, prog: str = "finetune.py") -> int:
    """Run one fine-tuning job from a command line; returns the exit status."""
    flags = parse_or_exit(argv, train_flags(), prog, FINETUNE_DESCRIPTION)
    quiet_optional_kernel_warning()
    from dense_lora.runtime import DenseLoRAError
    from dense_lora.train import INTERRUPTED_EXIT_CODE, config_from_flags, run

    try:
        summary = run(config_from_flags(flags))
    except DenseLoRAError as error:
        fail(error)
    return INTERRUPTED_EXIT_CODE if summary["status"] == "interrupted" else 0


def evaluate(kind: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Evaluate on one benchmark family ("commonsense" or "math") from a command line; returns the exit status."""
    prog = prog or f"{kind}_evaluate.py"
    description = (
        f"Evaluate a base model, optionally with a peft adapter, on the {kind} benchmarks with the LLM-Adapters "
        f"protocol.\n\n  {prog} --dataset all --base_model smollm2 --lora_weights runs/smollm2-r16\n\n"
        "Results go to --output_dir (default <lora_weights>/eval); rerunning the same command resumes. "
        "docs/evaluation.md explains the protocol."
    )
    flags = parse_or_exit(argv, eval_flags(), prog, description)
    quiet_optional_kernel_warning()
    from dense_lora.evaluate import run
    from dense_lora.runtime import DenseLoRAError

    try:
        run(kind, **flags)  # type: ignore[arg-type]
    except (DenseLoRAError, FileNotFoundError, ValueError) as error:
        fail(error)
    return 0


def evaluate_commonsense(argv: Sequence[str] | None = None, prog: str = "denselora-eval-commonsense") -> int:
    """Console script denselora-eval-commonsense (commonsense_evaluate.py calls it with its own name)."""
    return evaluate("commonsense", argv, prog=prog)


def evaluate_math(argv: Sequence[str] | None = None, prog: str = "denselora-eval-math") -> int:
    """Console script denselora-eval-math (math_evaluate.py calls it with its own name)."""
    return evaluate("math", argv, prog=prog)


def finetune_script(argv: Sequence[str] | None = None) -> int:
    """Console script denselora-finetune."""
    return finetune(argv, prog="denselora-finetune")


def params(argv: Sequence[str] | None = None, prog: str = "python -m dense_lora.params") -> int:
    """Print DenseLoRA vs LoRA trainable-parameter counts from a command line; returns the exit status."""
    description = (
        "Count trainable parameters of DenseLoRA and LoRA without any weights (the model is built on the meta "
        "device); shares are relative to the base model.\n\n  python -m dense_lora.params --model llama3-8b --r 16,32"
    )
    flags = parse_or_exit(argv, params_flags(), prog, description)
    quiet_optional_kernel_warning()
    from dense_lora.params import main

    try:
        main(**flags)
    except ValueError as error:
        fail(error)
    return 0


def params_script(argv: Sequence[str] | None = None) -> int:
    """Console script denselora-params."""
    return params(argv, prog="denselora-params")


def report_script(argv: Sequence[str] | None = None) -> int:
    """Console script denselora-report (dense_lora.report parses its own arguments with argparse)."""
    quiet_optional_kernel_warning()
    from dense_lora.report import main

    return main(None if argv is None else list(argv))


def run_main(entry: Callable[[Sequence[str] | None], int]) -> NoReturn:
    """``sys.exit`` with an entry point's status (what the top-level scripts and ``-m`` modules call)."""
    sys.exit(entry(None))


def positive_int(text: str) -> int:
    """argparse ``type=``: an integer above 0 (a size, a count of steps)."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse ``type=``: an integer of 0 or more (warm-up steps, repeats)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def dropout_rate(text: str) -> float:
    """argparse ``type=``: a probability in [0, 1), as --lora_dropout takes."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def existing_file(text: str) -> Path:
    """argparse ``type=``: a file that exists (an input to read)."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


class StrictArgumentParser(argparse.ArgumentParser):
    """argparse for the module CLIs (report, study, analysis, bench): no abbreviated flags (``--ou`` is not
    ``--out``), and an error is the one ``error:`` line with exit status 2 that every CLI of this project gives."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        known = [option for action in self._actions for option in action.option_strings]
        # Only a flag argparse does not know gets a suggestion; "argument --profile: invalid choice" names a known one.
        words = (word.split("=")[0].rstrip(":,") for word in message.split() if word.startswith("--"))
        unknown = [word for word in words if word not in known]
        close = difflib.get_close_matches(unknown[0], known, n=1) if unknown else []
        hint = f"; did you mean {close[0]}?" if close else ""
        print(f"error: {self.prog}: {message}{hint}", file=sys.stderr)
        sys.exit(2)
