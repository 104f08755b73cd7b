"""The evaluator, one module per job; :mod:`dense_lora.evaluate` is the public entry point that re-exports it.

* :mod:`~dense_lora.evaluation.settings`: the flags, the datasets and the adapter folder, checked before loading.
* :mod:`~dense_lora.evaluation.results`: the results folder's file format (JSONL parts, resume, merge, summary).
* :mod:`~dense_lora.evaluation.model`: loading the model and adapter, checking the fit, sizing batches.
* :mod:`~dense_lora.evaluation.run`: one benchmark across ranks, and :func:`~dense_lora.evaluation.run.run`.
"""
