"""The replication study: the paper's claims tested on a base model of any size, in one resumable command.

    bash scripts/study_cpu.sh                     # SmolLM2-135M on this CPU, about two hours
    bash scripts/study.sh llama3-8b 0,1,2,3       # the same study at paper scale on four GPUs

``plan`` says what runs (profiles, the grid of methods, seeds, learning rates), ``data`` builds the training mixes
and the clean held-out test slices, ``runner`` runs the phases through the project's own CLIs, ``aggregate``
turns the run folders into tables, plots and a report. ``python -m dense_lora.study --help`` lists the options.
"""
