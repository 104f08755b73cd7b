"""The fine-tuning harness, one module per job; ``dense_lora.train`` is its public entry point.

- ``config``: TrainConfig, its validation (one named check per rule) and the CLI flag conversion.
- ``run_dir``: the output-folder policy: one run per folder, checkpoints, resume, what --overwrite clears.
- ``callbacks``: the Trainer callbacks (metrics.jsonl, SIGTERM-safe stop).
- ``trainer``: the Trainer itself (transformers' own, its saves free of pickle).
- ``run``: the adapter, the model, TrainingArguments and the run itself, phase by phase.
"""
