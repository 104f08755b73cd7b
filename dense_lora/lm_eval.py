"""EleutherAI's lm-evaluation-harness on DenseLoRA adapters: lm-eval's own CLI, with DenseLoRA known to peft.

    python -m dense_lora.lm_eval --model hf \\
        --model_args pretrained=HuggingFaceTB/SmolLM2-135M-Instruct,peft=runs/denselora-r16 \\
        --tasks arc_easy,boolq --batch_size 16 --output_path results/lm-eval

lm-eval loads adapters with ``peft.PeftModel.from_pretrained``, and peft resolves an adapter folder's
``peft_type`` through its registry (``PEFT_TYPE_TO_CONFIG_MAPPING`` / ``PEFT_TYPE_TO_TUNER_MAPPING``); peft has no
plugin discovery, so a third-party type is only known once the module that registers it has been imported.
lm-eval never imports ``dense_lora``, hence this entry point: importing ``dense_lora`` registers "DENSELORA"
(``dense_lora.model.register``), then lm-eval's CLI runs unchanged on the remaining arguments, so every
lm-eval flag, task and model type works as documented by lm-eval. LoRA and DoRA adapters load as usual.

The Python route is the same two steps::

    import dense_lora  # registers DENSELORA with peft; must come before the model is loaded
    import lm_eval

    results = lm_eval.simple_evaluate(model="hf", model_args="pretrained=BASE,peft=ADAPTER", tasks=["arc_easy"])

Before lm-eval starts (and loads anything), a local ``peft=`` folder given in ``--model_args`` is checked: it
must hold an ``adapter_config.json`` whose ``peft_type`` peft knows; otherwise one line on stderr and exit 2.
lm-eval is an optional dependency (``pip install "lm-eval>=0.4,<0.5"``); without it this command says so.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from dense_lora.runtime import DenseLoRAError

PROG = "python -m dense_lora.lm_eval"
INSTALL_HINT = 'pip install "lm-eval>=0.4,<0.5"'


class LmEvalError(DenseLoRAError):
    """Bad input found before lm-eval runs; the message is one line."""


def model_args_values(argv: Sequence[str]) -> list[str]:
    """The ``--model_args`` / ``-a`` values as written (lm-eval 0.4 takes ``k=v,k2=v2`` or several ``k=v``)."""
    values: list[str] = []
    collecting = False
    for token in argv:
        if token.startswith("--model_args=") or token.startswith("-a="):
            values.append(token.split("=", 1)[1])
            collecting = False
        elif token in ("--model_args", "-a"):
            collecting = True
        elif collecting and not token.startswith("-"):
            values.append(token)
        else:
            collecting = False
    return values


def peft_paths(argv: Sequence[str]) -> list[str]:
    """Every ``peft=`` value in the model arguments (the adapter lm-eval will hand to PeftModel.from_pretrained)."""
    found = []
    for value in model_args_values(argv):
        for item in value.split(","):
            key, sep, path = item.strip().partition("=")
            if sep and key.strip() == "peft" and path.strip():
                found.append(path.strip())
    return found


def check_adapter(path: str) -> None:
    """Refuse a local adapter folder that peft could not load, before lm-eval loads the base model.

    A value that is not a local path is left to lm-eval (a hub id, resolved by peft). ``import dense_lora``
    has registered DENSELORA by the time this runs, so "unknown peft_type" means a method peft lacks.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        if path.startswith((".", "/", "~")) or path.count("/") != 1:
            raise LmEvalError(f"peft={path}: no such adapter folder")
        return  # owner/name: a hub id
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise LmEvalError(f"peft={path}: no adapter_config.json there (not a peft adapter folder)")
    try:
        peft_type = str(json.loads(config_file.read_text()).get("peft_type", ""))
    except (json.JSONDecodeError, AttributeError):
        raise LmEvalError(f"peft={path}: adapter_config.json is not a JSON object") from None
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        known = ", ".join(sorted(str(key) for key in PEFT_TYPE_TO_CONFIG_MAPPING))
        raise LmEvalError(f"peft={path}: peft_type {peft_type!r} is not a peft method here (known: {known})")


def main(argv: Sequence[str] | None = None) -> int:
    """Register DenseLoRA, check the adapter arguments, then run lm-eval's CLI on ``argv`` unchanged."""
    args = list(sys.argv[1:] if argv is None else argv)
    if importlib.util.find_spec("lm_eval") is None:
        print(f"error: lm-eval is not installed ({INSTALL_HINT})", file=sys.stderr)
        return 2
    import dense_lora  # noqa: F401  (registers the DENSELORA peft type)

    try:
        for path in peft_paths(args):
            check_adapter(path)
    except LmEvalError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = [PROG, *args]  # lm-eval's CLI reads sys.argv (0.4.x, every minor version)
    try:
        cli_evaluate()
    except SystemExit as done:  # argparse errors and --help exit through here
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
