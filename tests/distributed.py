"""Run a function on N CPU ranks (gloo), as torchrun would, and collect each rank's return value."""
import os
import socket
import tempfile
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, result_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import torch

    torch.set_num_threads(1)
    try:
        result = fn(rank, world_size, *args)
    except Exception:
        traceback.print_exc()
        raise
    torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))


def run_distributed(fn, world_size, *args):
    """fn(rank, world_size, *args) on world_size spawned processes; returns [result of rank 0, 1, ...]."""
    import torch

    with tempfile.TemporaryDirectory() as result_dir:
        mp.start_processes(_worker, args=(world_size, _free_port(), result_dir, fn, args), nprocs=world_size,
                           start_method="spawn", join=True)
        return [torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
