"""Run the CLIs' main() on many argv, each in a forked child with its own exit status and stderr file.

Usage: python tests/cli_fork_driver.py REPO PHASES_JSON, where PHASES_JSON is a list of phases, each
{name: [script, argv, stderr_path]} with script "finetune" or "commonsense_evaluate". The phases run one after
the other, the cases of a phase at the same time. Prints {name: [exit status, models loaded or null]} as the last line
of stdout, where "models loaded" counts the child's calls of transformers' ``PreTrainedModel.from_pretrained``
(every base model a CLI loads goes through it; peft adapters do not): the tests assert that bad input is refused
before a model loads, which holds on a machine of any speed, where a bound on seconds does not.

Why: importing torch/transformers/peft costs ~6 s per process on 2 cores (minutes when loaded), so the
modules the CLIs import lazily are imported once here, before forking; each case is still its own process.
"""

import json
import os
import runpy
import sys

from transformers import PreTrainedModel

import dense_lora.evaluate
import dense_lora.train  # noqa: F401  (what the CLIs import lazily: once, before forking)

SCRIPTS = ("finetune", "commonsense_evaluate")


def count_model_loads() -> list[str]:
    """From now on, record in the returned list each model ``PreTrainedModel.from_pretrained`` is called on."""
    loads: list[str] = []
    load = PreTrainedModel.from_pretrained.__func__

    def counted(cls, pretrained_model_name_or_path, *args, **kwargs):
        loads.append(str(pretrained_model_name_or_path))
        return load(cls, pretrained_model_name_or_path, *args, **kwargs)

    PreTrainedModel.from_pretrained = classmethod(counted)
    return loads


def loads_path(stderr_path: str) -> str:
    return stderr_path + ".model_loads"


def model_loads(stderr_path: str) -> int | None:
    """How many models a case loaded; None when its child died before writing the count (its status says how)."""
    try:
        with open(loads_path(stderr_path)) as file:
            return len(json.load(file))
    except FileNotFoundError:
        return None


def run_case(main, argv: list[str], stderr_path: str) -> None:
    """In the child: stderr to its file, main(argv), the models it loaded to a file, exit with the CLI's status."""
    os.dup2(os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    loads = count_model_loads()
    try:
        status = main(argv)
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        status = 1
    sys.stderr.flush()
    with open(loads_path(stderr_path), "w") as file:
        json.dump(loads, file)
    os._exit(status)


def main() -> None:
    repo, phases = sys.argv[1], json.loads(sys.argv[2])
    mains = {
        name: runpy.run_path(os.path.join(repo, name + ".py"), run_name="cli")["main"] for name in SCRIPTS
    }
    results = {}
    for phase in phases:
        children = {}
        for name, (script, argv, stderr_path) in phase.items():
            pid = os.fork()
            if pid == 0:
                run_case(mains[script], argv, stderr_path)
            children[pid] = (name, stderr_path)
        while children:
            pid, wait_status = os.wait()
            name, stderr_path = children.pop(pid)
            results[name] = (os.waitstatus_to_exitcode(wait_status), model_loads(stderr_path))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
