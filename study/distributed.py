"""One trial over several GPUs: `torchrun --nproc_per_node=N -m study.cli worker ...`.

Rank 0 alone talks to storage: it claims, asks, records and tells exactly as a
single-process worker, and before each trial broadcasts the resolved config to the other
ranks, which train it with it (trainers.loop splits every global batch across ranks and
takes the stop decision from rank 0). When rank 0 has no more work it broadcasts None and
every rank exits.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

from trainers.config import Target, TrialConfig


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int


def launched_ranks() -> Ranks | None:
    """The torchrun environment, or None for an ordinary single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_group(ranks: Ranks, device: str) -> str:
    """Join the process group (NCCL on GPUs, gloo on CPU); returns this rank's device."""
    import torch
    import torch.distributed as dist
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return f"cuda:{ranks.local_rank}" if use_cuda else "cpu"


def leave_group(clean: bool) -> None:
    """Every rank, on the way out. After a clean run the ranks meet once more before the
    group is torn down: a rank that exits while gloo's threads still serve a peer dies
    with "terminate called without an active exception" (SIGABRT)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def exit_rank(code: int) -> NoReturn:
    """End a rank's process once its group is left: flush, then `os._exit`, skipping the
    interpreter's and the C++ runtime's teardown. Under load, gloo's static state being
    destroyed at a normal exit occasionally aborted a rank ("terminate called without an
    active exception", SIGABRT) after all its work was done and stored."""
    import logging
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def announce(config: TrialConfig | None, prune: bool = True) -> None:
    """Rank 0: the next trial for every rank (None: no more work)."""
    import torch.distributed as dist
    payload = None if config is None else (config.to_json_dict(), prune)
    dist.broadcast_object_list([payload], src=0)


def receive() -> tuple[TrialConfig, bool] | None:
    import torch.distributed as dist
    box = [None]
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        return None
    values, prune = box[0]
    values["target"] = Target(**values["target"])
    return TrialConfig(**values), prune


def follow(device: str) -> int:
    """Ranks > 0: train each announced trial with rank 0 until told to stop; returns the
    number of trials taken part in."""
    from trainers.loop import DataCache, run_trial
    data, done = DataCache(), 0
    while (announced := receive()) is not None:
        config, prune = announced
        run_trial(dataclasses.replace(config, device=device), data_cache=data, prune=prune)
        done += 1
    return done
