"""The public entry point of the evaluator behind ``commonsense_evaluate.py`` and ``math_evaluate.py``.

One function, :func:`run`, does everything for both CLIs; the CLIs only fix the benchmark family. See
docs/evaluation.md for the protocol, the flags and the file layout. This module only re-exports: the work is
done in :mod:`dense_lora.evaluation` (settings, results files, model, orchestration), and the benchmarks are
listed in :mod:`dense_lora.benchmarks`. Import from here; the names below are the stable ones.

Files in the output folder, per benchmark:

* ``<dataset>.jsonl``: a header line ``{"header": <config>}`` then one record per example
  (``index, prompt, output, prediction, label, correct`` and, with ``--extraction both``, the strict
  pair too). Records are appended and flushed after every batch; under ``torchrun`` each rank appends to
  ``<dataset>.rank<r>.jsonl``. When the benchmark completes, every part is merged into ``<dataset>.jsonl``
  sorted by index, so the final file does not depend on interruptions or the number of processes.
* ``<dataset>.json``: accuracy, counts, config, adapter, versions; the run-dependent values (wall time,
  throughput, process count) sit under ``"timing"``. Written atomically (temporary file + ``os.replace``).

A rerun with the same config resumes: finished examples are read back (a line cut off by a kill is
dropped) and only the rest is generated, in the same batches as an uninterrupted run (see
:func:`dense_lora.generation.plan_batches`), so the final files are identical. A folder holding results
of another config or adapter is refused unless ``--overwrite``.
"""

from dense_lora.benchmarks import ACCEPTED, BENCHMARKS, MAX_OPTION_CHARS
from dense_lora.evaluation.model import (
    CPU_DEFAULT_BATCH_SIZE,
    GPU_MAX_BATCH_SIZE,
    check_adapter_loaded,
    choose_batch_size,
    load_model,
)
from dense_lora.evaluation.results import (
    earlier_batch_size,
    load_progress,
    read_part,
    score_record,
    summarize,
)
from dense_lora.evaluation.run import cli, evaluate_benchmark, run, stop_rule
from dense_lora.evaluation.settings import (
    DEFAULT_MAX_NEW_TOKENS,
    EXTRACTION_CHOICES,
    PICKLE_REFUSAL,
    EvalSettings,
    EvaluationError,
    Kind,
    adapter_info,
    check_safetensors,
    select_datasets,
)

__all__ = [
    "ACCEPTED",
    "BENCHMARKS",
    "CPU_DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_NEW_TOKENS",
    "EXTRACTION_CHOICES",
    "GPU_MAX_BATCH_SIZE",
    "MAX_OPTION_CHARS",
    "PICKLE_REFUSAL",
    "EvalSettings",
    "EvaluationError",
    "Kind",
    "adapter_info",
    "check_adapter_loaded",
    "check_safetensors",
    "choose_batch_size",
    "cli",
    "earlier_batch_size",
    "evaluate_benchmark",
    "load_model",
    "load_progress",
    "read_part",
    "run",
    "score_record",
    "select_datasets",
    "stop_rule",
    "summarize",
]
