"""Plumbing every driver shares: the one error type, atomic files, hashes, versions and process ranks.

One home for each of these, so training, evaluation, the report and the study write files, fingerprint
adapters and tell their rank the same way. torch is imported only where needed: the CLIs import this module
to check their arguments, which must take a fraction of a second.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class DenseLoRAError(Exception):
    """A problem the user can fix (a flag, a file, a folder). Every CLI prints it as one line and exits
    with cli.USAGE_EXIT_CODE (2).

    Messages from peft/transformers may span lines; the CLI contract is one line, so whitespace is folded.
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(" ".join(str(message).split()))


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def folder_problem(path: Path) -> str | None:
    """Why ``path`` cannot be an output folder (it, or the nearest existing path above it, is a file), or None.

    The CLIs ask before loading anything: creating the folder would otherwise fail with a traceback once the
    model had loaded."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else f"{candidate} exists and is not a folder"
    return None


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file, fsync and os.replace: a reader, or a crash, never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, payload: Any, *, sort_keys: bool = False) -> None:
    """Indented JSON, written atomically; values JSON cannot hold (paths, dtypes) are written as text."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=sort_keys, default=str) + "\n")


def write_jsonl_atomic(path: Path, rows: Any) -> None:
    """One JSON object per line, written atomically."""
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl_undamaged(path: Path) -> list[Any]:
    """The rows of a JSON Lines file, leaving out any line that does not parse (one a killed writer left
    half-written): for append-only logs such as metrics.jsonl, read both by resume and by the report."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def write_csv_atomic(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A header line and one line per row, written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def write_figure_atomic(figure: Any, path: Path, dpi: int = 120) -> None:
    """Save a matplotlib figure as PNG atomically (a killed report leaves the previous plot, not half of one)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    write_bytes_atomic(path, buffer.getvalue())


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks: identifies a test file or an adapter's weights in results."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    """The versions that decide what a run computes; recorded with every training summary and result."""
    import accelerate
    import datasets
    import peft
    import torch
    import transformers

    from dense_lora import __version__

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "dense_lora": __version__,
    }


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------


def world_size() -> int:
    """Number of processes, as set by torchrun / accelerate launch (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 writes files and prints; the others stay quiet."""
    return rank() == 0


@dataclass(frozen=True)
class Processes:
    """This process's place among ``torchrun`` workers (rank 0 of 1 without torchrun)."""

    rank: int
    world: int
    device: torch.device

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed

            torch.distributed.barrier()


@contextlib.contextmanager
def processes() -> Iterator[Processes]:
    """Join the ``torchrun`` group when launched by it: gloo on CPU (NCCL would need GPUs)."""
    import torch
    import torch.distributed

    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if world_size() == 1:
        yield Processes(0, 1, device)
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Processes(rank(), world_size(), device)
    finally:
        torch.distributed.destroy_process_group()
