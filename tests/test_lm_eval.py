"""lm-evaluation-harness on a DenseLoRA adapter of the real SmolLM2-135M-Instruct, offline.

A local lm-eval task (YAML + a process_docs function) scores the first 8 real ARC-Easy test questions of the
LLM-Adapters set as multiple-choice log-likelihood. The base model runs through the Python route
(``import dense_lora`` then ``lm_eval.simple_evaluate``), the adapter through ``python -m dense_lora.lm_eval``
(lm-eval's own CLI, ``--model hf --model_args pretrained=...,peft=...``). The test checks that the adapter is
applied (every log-likelihood moves) and that lm-eval's per-choice log-likelihoods equal ours, computed by a
plain forward pass of the same model on the same (context, continuation) pairs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from dense_lora import DenseLoraConfig
from dense_lora.lm_eval import check_adapter, main, peft_paths

REPO = Path(__file__).resolve().parents[1]
TASK = "denselora_arc_easy_ll"
LIMIT = 8  # questions: enough to compare every log-likelihood, few enough for CI on 2 cores
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

PROCESS_DOCS = '''
import re

CHOICE = re.compile(r"Answer(\\d+): (.*?)(?= Answer\\d+: |$)", re.S)


def process_docs(dataset):
    """LLM-Adapters ARC record -> question, answer texts, gold index (from "answerN")."""

    def split(record):
        question, options = record["instruction"].split("\\n\\n")[:2]
        choices = [text.strip() for _, text in CHOICE.findall(options)]
        return {
            "question": question.removeprefix("Please choose the correct answer to the question: "),
            "choices": choices,
            "label": int(record["answer"].removeprefix("answer")) - 1,
        }

    return dataset.map(split)
'''


def task_folder(folder: Path, data_file: Path) -> Path:
    """An lm-eval task over a real benchmark file: multiple-choice log-likelihood of the answer texts."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "utils.py").write_text(PROCESS_DOCS)
    (folder / f"{TASK}.yaml").write_text(
        textwrap.dedent(
            f"""\
            task: {TASK}
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {data_file}
              cache_dir: {folder / "hf-datasets-cache"}
            test_split: test
            output_type: multiple_choice
            process_docs: !function utils.process_docs
            doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
            doc_to_choice: "{{{{choices}}}}"
            doc_to_target: label
            metric_list:
              - metric: acc
                aggregation: mean
                higher_is_better: true
            """
        )
    )
    return folder


@pytest.fixture(scope="module")
def adapter(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DenseLoRA adapter on q/v with non-zero decoders (a fresh one is the identity: W_d starts at zero)."""
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model = get_peft_model(
        base, DenseLoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_seed=0)
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "denselora_decoder" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    folder = tmp_path_factory.mktemp("adapter") / "denselora-r8"
    model.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "DENSELORA"
    config["base_model_name_or_path"] = str(smollm2_dir)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _loglikelihoods(samples: Iterable[dict[str, Any]]) -> list[tuple[str, str, float]]:
    """(context, continuation, log-likelihood) per request, from in-memory or logged (JSON) samples."""
    out = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        arguments = sample["arguments"]
        if isinstance(arguments, dict):  # the logged file: {"gen_args_0": {"arg_0": ctx, "arg_1": cont}, ...}
            arguments = [(a["arg_0"], a["arg_1"]) for a in arguments.values()]
        for (context, continuation), response in zip(arguments, sample["resps"], strict=True):
            out.append((context, continuation, float(response[0][0])))
    return out


@torch.no_grad()
def our_loglikelihoods(
    model: torch.nn.Module, tokenizer: Any, pairs: list[tuple[str, str]], batch_size: int = 32
) -> list[float]:
    """Sum of log p(continuation tokens | context) per pair: context + continuation tokens, right-padded batches.

    Written from the definition, not from lm-eval's code: tokenize context and context + continuation, check that
    the context's tokens are a prefix (so the continuation's tokens are well defined), run the causal LM, add up
    the log-softmax of each continuation token given everything before it.
    """
    sequences, starts = [], []
    for context, continuation in pairs:
        context_ids = tokenizer(context, add_special_tokens=False).input_ids
        whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
        assert whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids)
        sequences.append(whole)
        starts.append(len(context_ids))
    out = []
    for first in range(0, len(sequences), batch_size):
        batch = sequences[first : first + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([row + [0] * (width - len(row)) for row in batch])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in batch])
        logits = model(input_ids=ids, attention_mask=mask).logits
        for row, (tokens, start) in enumerate(zip(batch, starts[first : first + batch_size], strict=True)):
            targets = torch.tensor(tokens[start:])
            logprobs = torch.log_softmax(logits[row, start - 1 : len(tokens) - 1].double(), dim=-1)
            out.append(float(logprobs.gather(1, targets[:, None]).sum()))
    return out


def _assert_close(ours: list[float], theirs: list[tuple[str, str, float]]) -> None:
    worst = max(abs(a - c) / abs(c) for a, (_, _, c) in zip(ours, theirs, strict=True))
    assert worst <= 1e-4, f"lm-eval and our log-likelihoods differ by up to {worst:.2e} (relative)"


def test_lm_eval_scores_a_denselora_adapter_and_equals_our_loglikelihoods(
    adapter: Path, smollm2_dir: Path, real_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    lm_eval = pytest.importorskip(
        "lm_eval", reason="lm-eval is not installed (pip install 'lm-eval>=0.4,<0.5')"
    )
    from lm_eval.tasks import TaskManager

    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    tasks = task_folder(tmp_path / "tasks", real_data("dataset/ARC-Easy/test.json"))

    # The Python route, on the bare base model.
    base_results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={smollm2_dir},dtype=float32",
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        limit=LIMIT,
        batch_size=8,
        device="cpu",
        log_samples=True,
    )
    base = _loglikelihoods(base_results["samples"][TASK])

    # The CLI route, with the adapter: lm-eval's own CLI behind python -m dense_lora.lm_eval.
    out = tmp_path / "lm-eval-out"
    command = [
        sys.executable, "-m", "dense_lora.lm_eval",
        "--model", "hf",
        "--model_args", f"pretrained={smollm2_dir},peft={adapter},dtype=float32",
        "--tasks", TASK, "--include_path", str(tasks),
        "--limit", str(LIMIT), "--batch_size", "8", "--device", "cpu",
        "--log_samples", "--output_path", str(out),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=REPO, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (samples_file,) = out.rglob(f"samples_{TASK}_*.jsonl")
    (results_file,) = out.rglob("results_*.json")
    tuned = _loglikelihoods(json.loads(line) for line in samples_file.read_text().splitlines())
    base_acc = base_results["results"][TASK]["acc,none"]
    tuned_acc = json.loads(results_file.read_text())["results"][TASK]["acc,none"]
    print(
        f"lm-eval acc on {LIMIT} ARC-Easy test questions: base {base_acc:.2f}, DenseLoRA adapter {tuned_acc:.2f}"
    )

    assert len(base) == len(tuned) >= 3 * LIMIT  # ARC-Easy has 3 to 5 choices per question
    assert [(c, x) for c, x, _ in base] == [(c, x) for c, x, _ in tuned]  # same requests
    moved = [abs(b - t) for (_, _, b), (_, _, t) in zip(base, tuned, strict=True)]
    assert min(moved) > 1e-4, "a request scored the same with and without the adapter: adapter not applied?"
    assert sum(moved) / len(moved) > 1e-2

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    pairs = [(context, continuation) for context, continuation, _ in base]
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    _assert_close(our_loglikelihoods(model, tokenizer, pairs), base)
    model = PeftModel.from_pretrained(model, adapter).eval()
    _assert_close(our_loglikelihoods(model, tokenizer, pairs), tuned)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--model", "hf", "--model_args", "pretrained=base,peft=/runs/a", "--tasks", "x"], ["/runs/a"]),
        (["-a", "pretrained=base", "peft=/runs/b", "dtype=float32", "--tasks", "x"], ["/runs/b"]),
        (["--model_args=peft=/runs/c,dtype=float32"], ["/runs/c"]),
        (["--model_args", "pretrained=base", "--tasks", "peft=/not/a/model/arg"], []),
    ],
)
def test_peft_paths_in_every_model_args_spelling(argv, expected):
    assert peft_paths(argv) == expected


def _lora_adapter(folder: Path, peft_type: str = "LORA") -> Path:
    folder.mkdir(parents=True)
    config = {"peft_type": peft_type, "r": 8, "target_modules": ["q_proj"], "base_model_name_or_path": "base"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "missing", "no such adapter folder"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "no adapter_config.json there"),
        (
            lambda tmp: _lora_adapter(tmp / "odd", "NOT_A_METHOD"),
            "peft_type 'NOT_A_METHOD' is not a peft method",
        ),
    ],
)
def test_bad_adapter_is_refused_before_lm_eval_starts(tmp_path, capsys, make, message):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'lm-eval>=0.4,<0.5')")
    adapter_dir = make(tmp_path)
    out = tmp_path / "out"
    argv = ["--model", "hf", "--model_args", f"pretrained=base,peft={adapter_dir}", "--tasks", "arc_easy"]
    assert main([*argv, "--output_path", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: peft=") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_denselora_lora_and_dora_adapters_pass_the_check(tmp_path):
    """After import dense_lora, peft knows DENSELORA beside its own LORA (DoRA is LORA with use_dora)."""
    check_adapter(str(_lora_adapter(tmp_path / "lora")))
    dense = tmp_path / "dense"
    DenseLoraConfig(r=4, target_modules=["q_proj"]).save_pretrained(str(dense))
    check_adapter(str(dense))
    check_adapter("HuggingFaceTB/some-adapter")  # a hub id is left to peft


def test_without_lm_eval_installed_says_how_to_install(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a)
    )
    assert main(["--model", "hf", "--tasks", "arc_easy"]) == 2
    assert capsys.readouterr().err == 'error: lm-eval is not installed (pip install "lm-eval>=0.4,<0.5")\n'
