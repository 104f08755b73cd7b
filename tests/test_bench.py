"""Smoke test of the training-step benchmark on the tiny model: it runs, and its numbers are sane.

Nothing here is timed: the checks are on things that do not depend on the machine (parameter counts, FLOP
and saved-byte orderings, the JSON and markdown written), so the test is stable on a loaded CI box.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from helpers import REPO, load_bench_script


def load_bench() -> ModuleType:
    return load_bench_script("train_step")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench()


def tiny_lora_params(r: int, layers: int = 3) -> int:
    """r·(in+out) for Q, K, V, Up, Down of the tiny LLaMA (hidden 64, kv 32, intermediate 96)."""
    shapes = [(64, 64), (64, 32), (64, 32), (64, 96), (96, 64)]
    return layers * sum(r * (i + o) for i, o in shapes)


def test_tiny_run_reports_sane_numbers(bench: ModuleType, tmp_path: Path) -> None:
    out, results_md = tmp_path / "run.json", tmp_path / "RESULTS.md"
    argv = ["--model", "tiny", "--r", "8", "--repeats", "1", "--warmup", "0", "--no_memory"]
    bench.main([*argv, "--out", str(out), "--results", str(results_md)])

    report = json.loads(out.read_text())
    assert report["machine"]["torch"] and report["machine"]["cores"] >= 1
    (run,) = report["runs"]
    assert run["settings"]["dtype"] == "fp32" and run["settings"]["checkpointing"] is False
    results = {r["method"]: r for r in run["results"]}
    assert set(results) == set(bench.DEFAULT_METHODS)

    for method, res in results.items():
        assert len(res["step_times_s"]) == 1 and 0 < res["median_step_s"] < 60, method
        assert res["flops"] > 0 and res["saved_bytes_per_token"] > 0, method
        assert res["loss"] == pytest.approx(res["loss"]) and 0 < res["loss"] < 20, method  # finite, ~ln(256)
    frozen, lora = results["frozen"], results["lora"]
    assert frozen["trainable_params"] == 0
    assert lora["trainable_params"] == tiny_lora_params(8)
    # DenseLoRA at the same r: shared W_e/W_d per module type (= one layer of LoRA) plus an r×r M per module.
    assert results["denselora"]["trainable_params"] == tiny_lora_params(8, layers=1) + 3 * 5 * 8 * 8
    assert results["dora"]["trainable_params"] > lora["trainable_params"]
    assert lora["ratio_to_lora"] == pytest.approx(1.0)
    assert lora["paired_ratio_to_lora"] == pytest.approx(1.0)
    for method in ("denselora", "denselora-reference", "lora", "dora"):
        res = results[method]
        assert res["flops"] > frozen["flops"], method  # adapters add matmuls
        assert res["saved_over_frozen_per_token"] > 0, method  # and activations for their weight gradients
    assert frozen["saved_over_frozen_per_token"] == 0
    # the per-op breakdown attributes every saved storage of the probed layer to an autograd node
    breakdown = results["denselora-reference"]["saved_breakdown"]
    assert breakdown and all(row["nodes"] != "?" for row in breakdown if "proj" in row["module"])

    text = results_md.read_text()
    assert "| method |" in text and "python bench/train_step.py --model tiny" in text
    assert (
        sum(line.startswith(("| denselora", "| lora", "| dora", "| frozen")) for line in text.splitlines())
        == 5
    )


def test_autocast_runs_what_finetune_bf16_runs(bench: ModuleType, tmp_path: Path) -> None:
    """--autocast times every step under bf16 autocast, as finetune.py --bf16 trains a bf16 base. DenseLoRA keeps
    its fused path there (the same tensors saved for backward as without autocast), while peft LoRA computes its
    adapter in bf16 and no longer keeps float32 copies of its inputs."""
    saved = {}
    for autocast in (False, True):
        out = tmp_path / f"run-{autocast}.json"
        argv = ["--model", "tiny", "--dtype", "bf16", "--methods", "denselora,lora,frozen", "--repeats", "1"]
        argv += ["--warmup", "0", "--no_memory", "--out", str(out), "--results", str(tmp_path / "RESULTS.md")]
        bench.main(argv + (["--autocast"] if autocast else []))
        (run,) = json.loads(out.read_text())["runs"]
        assert run["settings"]["autocast"] is autocast
        saved[autocast] = {r["method"]: r["saved_bytes_per_token"] for r in run["results"]}
    assert saved[True]["denselora"] == saved[False]["denselora"]
    assert saved[True]["lora"] < saved[False]["lora"]
    assert "dropout 0.05, bf16 autocast" in (tmp_path / "RESULTS.md").read_text()


def test_bf16_on_a_cpu_without_native_bf16_is_flagged(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """On an AVX2-only CPU bf16 matrix products are emulated and swamp every method's step: the run says so before
    it starts, and its results block records the CPU's instruction set and whether bf16 was native."""
    import dense_lora.models

    def cpu_bf16(native: bool | None) -> None:
        monkeypatch.setattr(dense_lora.models, "cpu_has_native_bf16", lambda: native)

    settings = bench.Settings(
        model="tiny", r=8, lora_alpha=16, methods=["lora"], dtype="bf16", batch=1, seq=8
    )
    for native in (False, True, None):
        cpu_bf16(native)
        note = bench.emulated_bf16_note(settings)
        assert "no native bf16" in note if native is False else note is None  # no warning on a guess
        assert bench.emulated_bf16_note(replace(settings, dtype="fp32")) is None
        assert bench.emulated_bf16_note(replace(settings, device="cuda")) is None
        info = bench.machine_info()
        assert info["cpu_bf16"] is native
        assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()

    cpu_bf16(False)
    out, results_md = tmp_path / "run.json", tmp_path / "RESULTS.md"
    argv = ["--model", "tiny", "--dtype", "bf16", "--device", "cpu", "--methods", "lora", "--repeats", "1"]
    bench.main([*argv, "--warmup", "0", "--no_memory", "--out", str(out), "--results", str(results_md)])
    assert "has no native bf16" in capsys.readouterr().err
    machine_line = next(line for line in results_md.read_text().splitlines() if line.startswith("- machine:"))
    assert f", {torch.backends.cpu.get_cpu_capability()}, bf16 emulated" in machine_line
    # reports written before these fields existed render as before
    report = json.loads(out.read_text())
    for key in ("cpu_capability", "cpu_bf16"):
        del report["machine"][key]
    assert "bf16" not in bench.render_block(report).split("- machine:")[1].split("\n")[0]


def test_paired_ratios_pair_each_repeat(bench: ModuleType) -> None:
    """Each repeat's step over LoRA's step of the same repeat: a machine that slows down for two repeats moves
    both methods' times, not their ratio."""
    times, lora = [1.0, 2.2, 2.0, 1.1, 1.2], [1.0, 2.0, 2.0, 1.0, 1.0]
    median, (first, third) = bench.paired_ratios(times, lora)
    assert median == pytest.approx(1.1)
    assert (first, third) == (pytest.approx(1.0), pytest.approx(1.1))
    assert bench.paired_ratios([3.0], [2.0]) == (1.5, (1.5, 1.5))


def test_median_interval_is_the_binomial_order_statistics(bench: ModuleType) -> None:
    """95% interval of the median: ranks 10 and 21 of 30 (P(Bin(30, 1/2) <= 9) = 0.021 <= 0.025 < P(<= 10)),
    ranks 6 and 15 of 20, the range below 6 values; the order of the values does not matter."""
    thirty = [float(v) for v in range(30, 0, -1)]
    assert bench.median_interval(thirty) == (10.0, 21.0)
    assert bench.median_interval([float(v) for v in range(1, 21)]) == (6.0, 15.0)
    assert bench.median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)
    assert bench.median_interval([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) == (1.0, 6.0)  # P(count = 0) = 1/64 <= 0.025
    assert bench.median_interval([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], level=0.5) == (3.0, 6.0)


def saved_bytes_of(
    bench: ModuleType, loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], weight_shape=(4, 4)
) -> int:
    """What ``measure_saved`` counts for one forward of ``loss_of(x, weight)``: x is a ``2 x 16 x 4`` float32
    leaf that requires grad (512 bytes), weight a parameter (never counted)."""
    settings = bench.Settings(model="tiny", dtype="fp32", batch=2, seq=16, methods=["frozen"])

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(weight_shape))

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> object:
            x = input_ids.float().unsqueeze(-1).expand(-1, -1, 4).contiguous().requires_grad_()
            return type("Out", (), {"loss": loss_of(x, self.weight)})()

    ids = torch.ones(2, 16, dtype=torch.long)
    return bench.measure_saved(Probe(), {"input_ids": ids, "labels": ids}, settings, "frozen", True)[
        "saved_bytes"
    ]


X_BYTES = 2 * 16 * 4 * 4


def test_saved_bytes_dedupe_storages(bench: ModuleType) -> None:
    """A storage saved by several ops (the same normed input feeds q, k and v) is counted once: x once (mul's two
    operands and mm's input are the same storage), 2x once (sin's input)."""
    saved = saved_bytes_of(bench, lambda x, w: (x * x).sum() + (x * 2).sin().sum() + (x @ w).sum())
    assert saved == 2 * X_BYTES


def test_saved_bytes_of_a_dropped_branch_are_not_counted(bench: ModuleType) -> None:
    """A branch the forward builds and then drops (peft's DoRA detaches a product of its weights this way) frees
    what it saved, as it does in training: x (sin's input) and norm (mul's other operand) count; eye * 3 and
    its product with the weight are gone."""

    def loss_of(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        norm = (torch.eye(4) * 3.0 @ weight).sin().detach()
        return (x.sin() * norm[0]).sum()

    assert saved_bytes_of(bench, loss_of) == X_BYTES + 4 * 4 * 4


def test_a_freed_storage_address_used_again_is_a_new_storage(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Storages are keyed by address, and an address freed by a dropped branch may be used again by a tensor
    saved later: that is a new storage, counted at its own size (the allocator's reuse is forced here by giving
    the 1024-byte storages of the dropped branch and the 64-byte norm the same key)."""
    storage_key = bench._storage_key
    monkeypatch.setattr(
        bench,
        "_storage_key",
        lambda t: ("cpu", 7) if t.untyped_storage().nbytes() in (1024, 64) else storage_key(t),
    )

    def loss_of(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        wide = (torch.ones(16, 16) * weight.sum()).sin()
        norm = wide[:4, :4].detach().clone()
        del wide  # the branch is freed (an address is only used again once freed)
        return (x.sin() * norm[0]).sum()

    assert saved_bytes_of(bench, loss_of, weight_shape=(3, 3)) == X_BYTES + 64  # 3 x 3: outside the collision


def test_mfu_counts_model_flops_not_the_recomputation(bench: ModuleType) -> None:
    """With checkpointing the FLOPs column counts the recomputed forward (it runs), MFU's numerator does not
    (it keeps the input gradients of the first layer, which checkpointing makes the step compute)."""
    results = {}
    for checkpointing in (False, True):
        settings = bench.Settings(model="tiny", dtype="fp32", batch=2, seq=16, methods=["lora"])
        settings.checkpointing = checkpointing
        base = bench.build_base(settings)
        batch = bench.make_batch(settings, base.config.vocab_size)
        results[checkpointing] = bench.count_method(base, "lora", settings, batch)[1]
    assert results[False].model_flops is None
    assert results[False].flops <= results[True].model_flops < results[True].flops
    recomputed = results[True].flops - results[True].model_flops
    assert (
        recomputed > 0.25 * results[False].flops
    )  # about a forward: a third of a step without checkpointing


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_denselora_layers_save_no_fixed_bytes_and_masks_cost_a_bit_per_element(
    bench: ModuleType, dropout: float
) -> None:
    """DenseLoRA's saved tensors all grow with tokens: with dropout they include its packed masks (one bit per
    masked element), which the shape heuristic must count as token-sized, not as weight-like "fixed" bytes."""
    settings = bench.Settings(
        model="tiny", dtype="bf16", r=8, lora_alpha=16, batch=2, seq=16, dropout=dropout
    )
    base = bench.build_base(settings)
    model = bench.attach_method(base, "denselora", settings)
    saved = bench.measure_saved(model, bench.make_batch(settings, 256), settings, "denselora", False)
    assert [t for t in saved["tensors"] if "proj" in t["module"] and not t["token_shaped"]] == []
    masks = [t for t in saved["tensors"] if t["dtype"] == "uint8"]
    if dropout == 0:
        assert masks == []
        return
    # per layer: q/k/v in one call (three x masks, hidden 3r, output 64 + 32 + 32), then up and down
    tokens, hidden, kv, inter, r = 32, 64, 32, 96, 8
    elements = [3 * hidden + 3 * r + hidden + 2 * kv, hidden + r + inter, inter + r + hidden]
    expected = 3 * sum(tokens * count // 8 for count in elements)  # every count here is a multiple of 4 and 8
    assert sum(t["nbytes"] for t in masks) == expected
    assert all(t["token_shaped"] for t in masks)


def test_only_matrix_variant_is_denselora_without_the_activation(bench: ModuleType, tmp_path: Path) -> None:
    """``denselora-only-matrix`` (opt-in) is the same adapter with the identity activation: same parameters, one
    token-sized matmul less in backward, and it is not among the default methods."""
    assert "denselora-only-matrix" in bench.METHODS and "denselora-only-matrix" not in bench.DEFAULT_METHODS
    out = tmp_path / "run.json"
    argv = ["--model", "tiny", "--r", "8", "--repeats", "1", "--warmup", "0", "--no_memory"]
    bench.main(
        [*argv, "--methods", "denselora,denselora-only-matrix,lora", "--out", str(out), "--no_results"]
    )
    (run,) = json.loads(out.read_text())["runs"]
    results = {r["method"]: r for r in run["results"]}
    gelu, identity, lora = results["denselora"], results["denselora-only-matrix"], results["lora"]
    assert identity["trainable_params"] == gelu["trainable_params"]
    # the only matmul the activation adds: backward recomputes the decoder output for the activation's derivative
    assert lora["flops"] < identity["flops"] < gelu["flops"]

    settings = bench.Settings(model="tiny", r=8, lora_alpha=16, methods=["denselora-only-matrix"])
    model = bench.attach_method(bench.build_base(settings), "denselora-only-matrix", settings)
    assert model.peft_config["default"].activation == "identity"


def test_per_layer_variant_computes_q_k_v_in_three_calls(bench: ModuleType, tmp_path: Path) -> None:
    """``denselora-per-layer`` (opt-in) is the same adapter without the q/k/v group: the grouped step computes
    the same products in fewer calls, so the two count the same FLOPs (each member's decoder GEMM writes its own
    columns; no block-diagonal product with zero blocks)."""
    assert "denselora-per-layer" in bench.METHODS and "denselora-per-layer" not in bench.DEFAULT_METHODS
    out = tmp_path / "run.json"
    argv = ["--model", "tiny", "--r", "8", "--repeats", "1", "--warmup", "0", "--no_memory", "--dropout", "0"]
    bench.main([*argv, "--methods", "denselora,denselora-per-layer", "--out", str(out), "--no_results"])
    (run,) = json.loads(out.read_text())["runs"]
    results = {r["method"]: r for r in run["results"]}
    grouped, per_layer = results["denselora"], results["denselora-per-layer"]
    assert grouped["trainable_params"] == per_layer["trainable_params"]
    assert grouped["flops"] == per_layer["flops"] > 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "denselora,lorra"], "unknown methods ['lorra']"),
        (["--results", "."], "--results . is a directory"),
        (["--out", "."], "--out . is a directory"),
        (["--batch", "0"], "--batch: must be a positive integer, got 0"),
        (["--dropout", "1.5"], "--dropout: must be in [0, 1), got 1.5"),
        (["--device", "bogus"], "--device 'bogus' is not a torch device"),
        (["--render", "missing.json"], "--render: no such file"),
    ],
)
def test_bad_arguments_exit_2_before_any_work(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--model", "tiny", "--repeats", "1", "--no_memory", *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "[bench" not in err  # nothing was run


def test_gpu_plan_is_valid_commands_and_needs_cuda(bench: ModuleType, tmp_path: Path) -> None:
    """bench/gpu.sh is run only where a GPU is lent, so its plan is checked here: every train_step command parses
    with the bench's own parser (memory at the recipe's dropout, both checkpointing modes), packing.py knows
    every flag it is given, and without CUDA the script is one error line and exit 2, nothing written."""
    script = REPO / "bench" / "gpu.sh"
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "gpu")}
    plan = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, check=True)
    lines = [shlex.split(line) for line in plan.stdout.splitlines()]
    steps = [bench.parse_args(words[2:]) for words in lines if words[1] == "bench/train_step.py"]
    assert [(a.model, a.batch, a.seq, a.checkpointing, a.dropout, a.no_memory) for a in steps] == [
        ("llama3-8b-shape", 4, 256, "both", 0.05, False),
        ("llama3-8b-shape", 4, 256, "both", 0.0, True),
    ]
    assert all(set(a.methods.split(",")) == {"denselora", "lora", "dora", "frozen"} for a in steps)
    (packing,) = [words for words in lines if words[1] == "bench/packing.py"]
    help_text = subprocess.run(
        [sys.executable, str(REPO / "bench" / "packing.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert all(word in help_text for word in packing if word.startswith("--"))

    if torch.cuda.is_available():
        return
    env.pop("DRY_RUN")
    refused = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "needs a CUDA device" in refused.stderr and not (tmp_path / "gpu").exists()


# ----------------------------------------------------------------------------------------------------------
# bench/profile_step.py: ops charged to the method and phase they ran in
# ----------------------------------------------------------------------------------------------------------


def fake_event(name: str, start: float, end: float, self_us: float = 0.0) -> SimpleNamespace:
    return SimpleNamespace(
        name=name, time_range=SimpleNamespace(start=start, end=end), self_cpu_time_total=self_us
    )


def test_profile_charges_each_op_to_the_phase_and_method_it_ran_in() -> None:
    profiler = load_bench_script("profile_step")
    events = [
        fake_event("forward lora", 0, 100),
        fake_event("aten::mm", 10, 20, 10),
        fake_event("backward lora", 100, 300),
        fake_event("aten::mm", 150, 190, 40),
        fake_event("aten::zero_", 310, 320, 10),  # between phases: charged to nobody
        fake_event("forward denselora", 400, 450),
        fake_event("aten::mm", 410, 420, 8),
        fake_event("aten::gelu", 420, 430, 6),
        fake_event("backward denselora", 450, 650),
        fake_event("aten::gelu_backward", 500, 520, 20),
    ]
    report = profiler.charge(events, steps=2)
    assert list(report) == ["denselora", "lora"]  # the project's order, not the profile's
    assert report["lora"]["phases_ms"] == {"forward": 0.05, "backward": 0.1}
    assert report["lora"]["ops_ms"] == {"aten::mm": {"forward": 0.005, "backward": 0.02}}
    assert report["denselora"]["ops_ms"] == {
        "aten::mm": {"forward": 0.004},
        "aten::gelu": {"forward": 0.003},
        "aten::gelu_backward": {"backward": 0.01},
    }
    assert report["lora"]["calls"] == {"aten::mm": 1.0}  # two calls over two steps
    assert report["denselora"]["calls"] == {"aten::mm": 0.5, "aten::gelu": 0.5, "aten::gelu_backward": 0.5}


def test_profile_step_runs_interleaved_on_the_tiny_model(tmp_path: Path) -> None:
    profiler = load_bench_script("profile_step")
    out = tmp_path / "profile.json"
    argv = ["--model", "tiny", "--batch", "1", "--seq", "16", "--steps", "2", "--dropout", "0"]
    profiler.main([*argv, "--out", str(out)])
    methods = json.loads(out.read_text())["methods"]
    assert list(methods) == ["denselora", "lora", "frozen"]
    for method, report in methods.items():
        phases = report["phases_ms"]
        assert phases["forward"] > 0 and phases["backward"] > 0, method
        charged = sum(sum(cell.values()) for cell in report["ops_ms"].values())
        # self times fit inside the phases
        assert 0 < charged <= phases["forward"] + phases["backward"], method
    dense = methods["denselora"]["ops_ms"]
    assert set(dense["_DenseLoraGroupFunction"]) == {"forward"}  # the fused path ran, q/k/v together
    assert set(dense["_DenseLoraGroupFunctionBackward"]) == {"backward"}
    assert "aten::gelu_backward" in dense and "aten::gelu_backward" not in methods["lora"]["ops_ms"]
    assert not any(name.startswith("_DenseLora") for name in methods["frozen"]["ops_ms"])


def test_profile_step_profiles_the_dtype_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """--dtype bf16 profiles the tiny model in bf16 (default fp32), with train_step.py's note on a CPU that
    emulates bf16."""
    import dense_lora.models

    monkeypatch.setattr(dense_lora.models, "cpu_has_native_bf16", lambda: False)
    profiler = load_bench_script("profile_step")
    out = tmp_path / "profile.json"
    argv = [
        "--model",
        "tiny",
        "--batch",
        "1",
        "--seq",
        "8",
        "--steps",
        "1",
        "--dropout",
        "0",
        "--dtype",
        "bf16",
    ]
    profiler.main([*argv, "--out", str(out)])
    assert json.loads(out.read_text())["settings"]["dtype"] == "bf16"
    assert "has no native bf16" in capsys.readouterr().err


def test_profile_step_rejects_bad_arguments_before_loading_anything(capsys: pytest.CaptureFixture) -> None:
    profiler = load_bench_script("profile_step")
    with pytest.raises(SystemExit) as exit_info:
        profiler.main(["--steps", "0"])
    assert exit_info.value.code == 2
    assert "--steps must be at least 1" in capsys.readouterr().err


# bench/fused_dropout.py: the fused function now against another revision, one layer or siblings sharing x


@pytest.mark.parametrize("shape", ["12,20", "12,12,4,4"])
def test_fused_dropout_compares_a_revision_with_now(shape: str, capsys: pytest.CaptureFixture) -> None:
    """Against HEAD's own fused.py (git is there in every checkout), one layer or a q/k/v-like group: both dropout
    settings are timed and reported as paired ratios."""
    script = load_bench_script("fused_dropout")
    argv = [
        "--old",
        "HEAD",
        "--shape",
        shape,
        "--tokens",
        "8",
        "--r",
        "2",
        "--repeats",
        "3",
        "--dtype",
        "fp32",
    ]
    summary = script.main(argv)
    assert set(summary) == {"p=0.05", "p=0"}
    for cell in summary.values():
        assert 0 < cell["q1"] <= cell["median"] <= cell["q3"]
    assert "p=0: now / HEAD, paired median" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"), [(["--shape", "12"], "--shape takes"), (["--repeats", "0"], "--repeats")]
)
def test_fused_dropout_rejects_bad_arguments(
    extra: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    script = load_bench_script("fused_dropout")
    with pytest.raises(SystemExit) as exit_info:
        script.main(extra)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_fused_dropout_refuses_a_revision_without_the_function_timed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A revision from before q/k/v grouping has no fused_group_add: one line and exit 2, not a traceback."""
    script = load_bench_script("fused_dropout")
    old = SimpleNamespace(fused_dense_add=lambda base, x, e, m, d, activation, scaling, p, seed=None: None)
    monkeypatch.setattr(script, "load_revision", lambda revision: old)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--old", "abc1234", "--shape", "12,12,4,4", "--tokens", "8", "--repeats", "1"])
    assert exit_info.value.code == 2
    assert "revision abc1234 has no fused_group_add" in capsys.readouterr().err


# bench/native_probe.py: the fused layer against a C++ twin making the same ATen calls


@pytest.mark.parametrize("flag", ["--repeats", "--seq", "--threads"])
def test_native_probe_rejects_bad_arguments_before_compiling(
    flag: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Bad input is refused in one line with exit 2 before the minute of compiling or any model load."""
    script = load_bench_script("native_probe")
    import torch.utils.cpp_extension

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled before checking its arguments")

    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", no_compiling)
    with pytest.raises(SystemExit) as exit_info:
        script.main([flag, "0"])
    assert exit_info.value.code == 2
    assert f"argument {flag}: must be a positive integer, got 0" in capsys.readouterr().err
