"""Training checkpoints in the folder contract of docs/checkpoint-format.md, and save-on-signal.

`--save` holds `iter_XXXXXXX/` folders, `latest_checkpointed_iteration.txt` (written last, by
rank 0, after every rank finished writing), `router_upcycling.json` (its `training` block names
the newest iteration) and `tokenizer/`. An iteration folder holds:

- the torch_dist checkpoint: `model` (and on GPU megatron's distributed optimizer `optimizer`);
- `train_state/common.pt` (rank 0): iteration, consumed samples, scheduler state, world size;
- `train_state/rank_NNNNN.pt` (every rank): RNG states, and on CPU the rank's torch AdamW state.
  CPU runs therefore resume with the same number of ranks; GPU runs reshard model and optimizer
  through torch_dist and reseed RNG when the world size changed.
"""
import os
import random
import shutil
import signal
from typing import Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from router_upcycling.mcore.checkpoint import (
    copy_tokenizer, iteration_dir_name, model_state, read_metadata, read_tracker, resolve_iteration_dir,
    save_sharded, write_metadata, write_tracker,
)
from router_upcycling.train.arguments import TrainError

STATE_DIR = "train_state"
COMMON_FILE = "common.pt"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def resumes_in_place(save_dir: str, resume_dir: Optional[str]) -> bool:
    """Whether this run continues the checkpoints already in --save (then it keeps its metadata)."""
    return bool(resume_dir) and os.path.realpath(resume_dir) == os.path.realpath(save_dir)


def check_save_dir(save_dir: str, resume_dir: Optional[str]) -> None:
    """Never write into another run's checkpoints."""
    if read_tracker(save_dir) is not None and not resumes_in_place(save_dir, resume_dir):
        raise TrainError(f"--save {save_dir} already holds checkpoints; resume with --load {save_dir} or choose another folder")


def prepare_save_dir(save_dir: str, metadata: dict, tokenizer_dir: str, resuming_from_save: bool) -> None:
    """Give a new --save folder its metadata and tokenizer (rank 0 writes)."""
    if dist.get_rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        if not resuming_from_save:
            write_metadata(save_dir, {k: v for k, v in metadata.items() if k != "format_version"})
            copy_tokenizer(tokenizer_dir, save_dir)
    dist.barrier()


def save_checkpoint(save_dir: str, iteration: int, consumed_samples: int, seq_length: int,
                    model, optimizer, scheduler) -> str:
    """Write iter_XXXXXXX on every rank, then (rank 0) the metadata's training block and the tracker."""
    iteration_dir = os.path.join(save_dir, iteration_dir_name(iteration))
    if dist.get_rank() == 0 and os.path.exists(iteration_dir):
        shutil.rmtree(iteration_dir)  # left by an interrupted save: the tracker never named it
    dist.barrier()
    sharded = model_state(model)
    if optimizer.is_sharded:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"])
    save_sharded(sharded, iteration_dir)
    dist.barrier()
    state_dir = os.path.join(iteration_dir, STATE_DIR)
    os.makedirs(state_dir, exist_ok=True)
    local = {"rng": rng_state(), "optimizer": None if optimizer.is_sharded else optimizer.state_dict()}
    torch.save(local, os.path.join(state_dir, rank_file(dist.get_rank())))
    if dist.get_rank() == 0:
        common = {"iteration": iteration, "consumed_samples": consumed_samples,
                  "scheduler": scheduler.state_dict(), "world_size": dist.get_world_size()}
        torch.save(common, os.path.join(state_dir, COMMON_FILE))
    dist.barrier()
    if dist.get_rank() == 0:
        metadata = read_metadata(save_dir)
        metadata["training"] = {"iteration": iteration, "consumed_tokens": consumed_samples * seq_length}
        write_metadata(save_dir, {k: v for k, v in metadata.items() if k != "format_version"})
        write_tracker(save_dir, iteration)
    dist.barrier()
    return iteration_dir


def load_checkpoint(load_dir: str, model, optimizer, scheduler) -> Tuple[int, int]:
    """Restore everything saved by save_checkpoint; returns (iteration, consumed samples)."""
    from megatron.core import dist_checkpointing

    iteration_dir = resolve_iteration_dir(load_dir)
    state_dir = os.path.join(iteration_dir, STATE_DIR)
    common = torch.load(os.path.join(state_dir, COMMON_FILE), weights_only=False)
    local_path = os.path.join(state_dir, rank_file(dist.get_rank()))
    same_world = common["world_size"] == dist.get_world_size() and os.path.isfile(local_path)
    if not optimizer.is_sharded and not same_world:
        raise TrainError(f"{iteration_dir} was written by {common['world_size']} CPU ranks; resume CPU runs with the same number")
    sharded = model_state(model)
    if optimizer.is_sharded:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"], is_loading=True)
    state = dist_checkpointing.load(sharded, iteration_dir)
    model.load_state_dict(state["model"])
    if optimizer.is_sharded:
        optimizer.load_state_dict(state["optimizer"])
    if same_world:
        local = torch.load(local_path, weights_only=False)
        set_rng_state(local["rng"])
        if not optimizer.is_sharded:
            optimizer.load_state_dict(local["optimizer"])
    scheduler.load_state_dict(common["scheduler"])
    return common["iteration"], common["consumed_samples"]


class ExitSignal:
    """SIGTERM / SIGUSR1 (Slurm's warning before the time limit) ask for a checkpoint and a clean exit.

    The handler only sets a flag; the training loop acts at a step boundary, after every rank agreed
    (an all-reduce of the flags), so all ranks save the same iteration.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def any_rank_received(self) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0])
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
