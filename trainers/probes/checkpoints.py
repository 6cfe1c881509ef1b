"""Final-weight checkpoints: a state_dict on disk under a size budget.

The database stores only the path and byte size that `save_checkpoint` returns. A file is
written to a temporary name in the target folder and renamed only once it is complete
and within budget, so an interrupted or over-budget save leaves nothing behind.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn


class CheckpointBudgetError(ValueError):
    """The checkpoint would exceed its size budget; nothing was written."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    size_bytes: int


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.2f} MB ({size:,} bytes)"


def _budget_error(size: int, max_bytes: int, path: Path, what: str) -> CheckpointBudgetError:
    return CheckpointBudgetError(
        f"checkpoint {path} {what} {_megabytes(size)}, over the budget of "
        f"{_megabytes(max_bytes)}; raise the checkpoint size budget or turn checkpoints off")


def _compact_cpu_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # torch.save writes a view's whole storage: clone so each tensor saves only itself.
    return {name: t.detach().cpu().clone() for name, t in state.items()}


def save_checkpoint(weights: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike, *,
                    max_bytes: int | None = None) -> CheckpointInfo:
    """Save a model's state_dict (or a state_dict) to `path` with torch.save.

    `max_bytes`: size budget in bytes (None: no limit). Raises CheckpointBudgetError,
    leaving no file, when the raw tensor bytes or the written file exceed it.
    Returns the final path and its size in bytes. Parent folders are created.
    """
    path = Path(path)
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    state = _compact_cpu_state(state)
    raw = sum(t.numel() * t.element_size() for t in state.values())
    if max_bytes is not None and raw > max_bytes:  # cheap check before writing anything
        raise _budget_error(raw, max_bytes, path, "would hold at least")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
        size = os.path.getsize(temporary)
        if max_bytes is not None and size > max_bytes:
            raise _budget_error(size, max_bytes, path, "would take")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return CheckpointInfo(path=path, size_bytes=size)


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu",
                    model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Read a state_dict saved by `save_checkpoint` (tensors only: weights_only=True);
    if `model` is given, also load it into the model (strictly)."""
    state = torch.load(Path(path), map_location=map_location, weights_only=True)
    if model is not None:
        model.load_state_dict(state)
    return state
