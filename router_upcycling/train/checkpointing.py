"""Training checkpoints as Megatron-LM writes them (torch_dist), in the folder contract of
docs/checkpoint-format.md, and save-on-signal.

`--save` holds `iter_XXXXXXX/` folders, `latest_checkpointed_iteration.txt` (written last, by rank 0,
after every rank finished writing), `router_upcycling.json` (its `training` block names the newest
iteration) and `tokenizer/`. An iteration folder is one torch_dist checkpoint holding:

- `model`: the model's sharded state (reshards to any tensor/pipeline/expert/data layout);
- `optimizer`: megatron-core's optimizer state with float32 main weights. The distributed optimizer
  saves it as `dp_reshardable` (Megatron-LM's default: every rank writes its own shard, no gather; resumes
  with any data-parallel size but the same tensor/pipeline/expert sizes) or, with
  --dist-ckpt-optim-fully-reshardable, `fully_reshardable` (gathered per data-parallel group while
  saving; resumes on any layout). The plain optimizer's state is sharded like the model: any layout;
- common values (rank 0): `iteration`, `consumed_samples`, `opt_param_scheduler` (in Megatron-LM's units:
  samples), `parallel_layout`, and Megatron-LM's `checkpoint_version` and `args` (the architecture, the
  parallel sizes, `consumed_train_samples`): Megatron-LM's trainer resumes these checkpoints and checks its
  flags against them, and ours resumes Megatron-LM's (router_upcycling.megatron_lm);
- `rng_state`: the Python, NumPy, torch and model-parallel tracker RNG states in Megatron-LM's layout (one per
  pipeline and tensor rank), restored when the tensor, pipeline and expert sizes are the same (otherwise the
  fresh seeding of --seed stands, as Megatron-LM does);
- the content metadata Megatron-LM records (`distrib_optim_sharding_type`, `singleton_local_shards`,
  `chained_optim_avoid_prefix`), which the loader reads back to rebuild the same sharding.
"""
import logging
import os
import random
import shutil
import signal
from typing import Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from router_upcycling.checkpoint_folder import (
    TRACKER_FILE, copy_tokenizer, iteration_dir_name, read_metadata, readable_training_iterations, saved_iterations,
    tracked_training_iteration, write_metadata, write_tracker,
)
from router_upcycling.mcore.checkpoint import CHECKPOINT_VERSION, model_state, save_sharded
from router_upcycling.mcore import torch_adam
from router_upcycling.outputs import disk_full_error
from router_upcycling.mcore.parallel import current_device
from router_upcycling.train.config import TrainError, TrainingConfig

log = logging.getLogger("router_upcycling.train")
FULLY_RESHARDABLE = "fully_reshardable"


def parallel_layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"tensor": ps.get_tensor_model_parallel_world_size(), "pipeline": ps.get_pipeline_model_parallel_world_size(),
            "expert": ps.get_expert_model_parallel_world_size(), "data": ps.get_data_parallel_world_size()}


def describe_layout(layout: dict) -> str:
    return (f"--tensor-model-parallel-size {layout['tensor']} --pipeline-model-parallel-size {layout['pipeline']} "
            f"--expert-model-parallel-size {layout['expert']}")


def sharding_metadata(config: TrainingConfig) -> dict:
    """Megatron-LM's `_build_sharded_state_dict_metadata` (core_v0.16.1), for our flags."""
    from megatron.core import parallel_state

    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if config.use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = FULLY_RESHARDABLE if config.dist_ckpt_optim_fully_reshardable else "dp_reshardable"
    return metadata | {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}


def serializable(metadata: dict) -> dict:
    return {key: value for key, value in metadata.items() if key != "dp_cp_group"}


def rng_state():
    """This rank's RNG states as Megatron-LM saves them (`get_rng_state`, torch_dist, without
    --data-parallel-random-init): one list per (pipeline, tensor) rank, written by the first data-parallel replica
    (every replica is seeded alike)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.cuda.get_rng_state(),
             "rng_tracker_states": get_cuda_rng_tracker().get_states()}
    return ShardedObject("rng_state", [state], (ps.get_pipeline_model_parallel_world_size(),
                                                ps.get_tensor_model_parallel_world_size()),
                         (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                         replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


def legacy_rng_state():
    """The RNG states' place in checkpoints of ours written before they carried Megatron-LM's `args` (one per rank)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", None, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def set_rng_state(state) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    if isinstance(state, list):  # Megatron-LM's layout
        state = state[0]
        names = ("random_rng_state", "np_rng_state", "torch_rng_state", "cuda_rng_state", "rng_tracker_states")
    else:
        names = ("python", "numpy", "torch", "device", "tracker")
    python, numpy_state, torch_state, device, tracker = (state[name] for name in names)
    random.setstate(python)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)
    torch.cuda.set_rng_state(device)
    get_cuda_rng_tracker().set_states(tracker)


# Megatron-LM counts its schedule in samples (the scheduler steps by the global batch size each iteration); ours steps
# once per iteration. Checkpoints hold Megatron-LM's units, so either trainer resumes the other's.
SCHEDULE_STEP_KEYS = ("num_steps", "lr_warmup_steps", "lr_decay_steps", "wd_incr_steps")


def scheduler_state_in_samples(state: dict, global_batch_size: int) -> dict:
    return {key: value * global_batch_size if key in SCHEDULE_STEP_KEYS else value for key, value in state.items()}


def scheduler_state_in_iterations(state: dict, global_batch_size: int) -> dict:
    return {key: value // global_batch_size if key in SCHEDULE_STEP_KEYS else value for key, value in state.items()}


def megatron_lm_args(config: TrainingConfig, iteration: int, consumed_samples: int):
    """Megatron-LM's common-state `args`: the architecture (from --save's metadata), the layout, the data position."""
    from router_upcycling.checkpoint_folder import read_checkpoint_settings
    from router_upcycling.megatron_lm.flags import checkpoint_args

    _, arch, moe = read_checkpoint_settings(config.save)
    layout = parallel_layout()
    return checkpoint_args(arch, moe, tensor=layout["tensor"], pipeline=layout["pipeline"], expert=layout["expert"],
                           data=layout["data"], consumed_train_samples=consumed_samples, iteration=iteration,
                           seq_length=config.seq_length, micro_batch_size=config.micro_batch_size,
                           global_batch_size=config.global_batch_size, train_iters=config.train_iters,
                           use_distributed_optimizer=config.use_distributed_optimizer)


def saved_layout(common: dict) -> dict:
    """The parallel layout a checkpoint was written with: ours record it; Megatron-LM's `args` hold its sizes."""
    if "parallel_layout" in common:
        return common["parallel_layout"]
    args = common.get("args")
    return {"tensor": getattr(args, "tensor_model_parallel_size", 1), "pipeline": getattr(args, "pipeline_model_parallel_size", 1),
            "expert": getattr(args, "expert_model_parallel_size", 1), "data": getattr(args, "data_parallel_size", None)}


def resumes_in_place(save_dir: str, resume_dir: Optional[str]) -> bool:
    """Whether this run continues the checkpoints already in --save (then it keeps its metadata)."""
    return bool(resume_dir) and os.path.realpath(resume_dir) == os.path.realpath(save_dir)


def holds_checkpoints(save_dir: str) -> bool:
    """A tracker (readable or not) or any iteration folder: another run's checkpoints, even half-written ones."""
    return os.path.isfile(os.path.join(save_dir, TRACKER_FILE)) or bool(saved_iterations(save_dir))


def check_save_dir(save_dir: str, resume_dir: Optional[str]) -> None:
    """Never write into another run's checkpoints."""
    if holds_checkpoints(save_dir) and not resumes_in_place(save_dir, resume_dir):
        raise TrainError(f"--save {save_dir} already holds checkpoints; resume with --load {save_dir} or choose another folder")


def prepare_save_dir(save_dir: str, metadata: dict, tokenizer_dir: str, resuming_from_save: bool) -> None:
    """Give a new --save folder its metadata and tokenizer (rank 0 writes)."""
    if dist.get_rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        if not resuming_from_save:
            write_metadata(save_dir, {k: v for k, v in metadata.items() if k != "format_version"})
            copy_tokenizer(tokenizer_dir, save_dir)
    dist.barrier()


def save_checkpoint(config: TrainingConfig, iteration: int, consumed_samples: int, model, optimizer, scheduler) -> str:
    """Write iter_XXXXXXX on every rank, then (rank 0) the metadata's training block and the tracker."""
    iteration_dir = os.path.join(config.save, iteration_dir_name(iteration))
    if dist.get_rank() == 0 and os.path.exists(iteration_dir):
        shutil.rmtree(iteration_dir)  # left by an interrupted save: the tracker never named it
    dist.barrier()
    metadata = sharding_metadata(config)
    state = model_state(model, metadata)
    state["optimizer"] = optimizer.sharded_state_dict(state["model"], metadata=metadata)
    state.update(checkpoint_version=CHECKPOINT_VERSION, iteration=iteration, consumed_samples=consumed_samples,
                 args=megatron_lm_args(config, iteration, consumed_samples),
                 opt_param_scheduler=scheduler_state_in_samples(scheduler.state_dict(), config.global_batch_size),
                 parallel_layout=parallel_layout(), rng_state=rng_state())
    try:
        save_sharded(state, iteration_dir, content_metadata=serializable(metadata))
    except BaseException as error:  # torch's CheckpointException, which a full disk raises, is a BaseException
        # the tracker still names the previous checkpoint: it stays the resume point; the partial folder goes
        full = None if isinstance(error, (KeyboardInterrupt, SystemExit)) else disk_full_error(error, iteration_dir)
        if dist.get_rank() == 0:
            shutil.rmtree(iteration_dir, ignore_errors=True)
        if full:
            raise full from None
        raise
    dist.barrier()
    if dist.get_rank() == 0:
        run_metadata = read_metadata(config.save)
        run_metadata["training"] = {"iteration": iteration, "consumed_tokens": consumed_samples * config.seq_length}
        write_metadata(config.save, {k: v for k, v in run_metadata.items() if k != "format_version"})
        write_tracker(config.save, iteration)
    dist.barrier()
    return iteration_dir


def check_optimizer_layout(iteration_dir: str, saved: dict, content_metadata: dict) -> None:
    """dp_reshardable optimizer state resumes only with the tensor/pipeline/expert sizes it was saved with."""
    sharding_type = content_metadata.get("distrib_optim_sharding_type")
    if sharding_type in (None, FULLY_RESHARDABLE):
        return
    now = parallel_layout()
    if any(saved[dim] != now[dim] for dim in ("tensor", "pipeline", "expert")):
        raise TrainError(f"{iteration_dir} holds {sharding_type} optimizer state, which resumes only with "
                         f"{describe_layout(saved)} (any data-parallel size); resume with those sizes, add "
                         f"--no-load-optim, or save with --dist-ckpt-optim-fully-reshardable")


def newest_readable_iteration(load_dir: str) -> str:
    """The folder of the newest saved iteration that reads, at or before the tracker's: a preempted or damaged write
    (a truncated shard, a damaged common state, index or tracker) is skipped with a warning naming the file, as
    Megatron-LM users expect auto-resume to recover rather than stop."""
    _, tracker_problem = tracked_training_iteration(load_dir)
    skipped = []
    for name, problem in readable_training_iterations(load_dir):
        if problem is None:
            if dist.get_rank() == 0:
                if tracker_problem:
                    log.warning("resuming from %s, the newest iteration that reads: %s", name, tracker_problem)
                for skipped_name, why in skipped:
                    log.warning("resuming from %s: skipped %s, which does not load: %s", name, skipped_name, why)
            return os.path.join(load_dir, name)
        skipped.append((name, problem))
    reasons = "; ".join(f"{name}: {why}" for name, why in skipped) or "no iteration folder"
    raise TrainError(f"--load {load_dir} holds no readable checkpoint ({reasons})")


def load_checkpoint(config: TrainingConfig, load_dir: str, model, optimizer, scheduler) -> Tuple[int, int]:
    """Restore what save_checkpoint wrote (its newest readable iteration), resharded to this run's layout; returns
    (iteration, consumed samples)."""
    from megatron.core import dist_checkpointing, parallel_state

    iteration_dir = newest_readable_iteration(load_dir)
    common = dist_checkpointing.load_common_state_dict(iteration_dir)
    content_metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    layout = saved_layout(common)
    load_optimizer = not config.no_load_optim
    if load_optimizer:
        check_optimizer_layout(iteration_dir, layout, content_metadata)
    metadata = content_metadata | {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    state = model_state(model, metadata)
    if load_optimizer:
        torch_adam.before_loading(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=True, metadata=metadata)
    current = parallel_layout()
    same_layout = all(layout[dim] == current[dim] for dim in ("tensor", "pipeline", "expert"))
    if "args" not in common:  # ours, from before the checkpoints carried Megatron-LM's args
        same_layout = same_layout and layout["data"] == current["data"]
    if same_layout:
        state["rng_state"] = rng_state() if "args" in common else legacy_rng_state()
    loaded = dist_checkpointing.load(state, iteration_dir)
    with torch.no_grad():  # fp32 main weights of the distributed optimizer are views of the model's parameters
        model.load_state_dict(loaded["model"])
        if load_optimizer:
            optimizer.load_state_dict(loaded["optimizer"])
            torch_adam.after_loading(optimizer)
        else:
            optimizer.reload_model_params()  # main (float32) weights from the loaded model weights
    if same_layout:
        set_rng_state(loaded["rng_state"])
    elif dist.get_rank() == 0:
        log.warning("resuming %s saved with layout %s on layout %s: RNG states are freshly seeded", iteration_dir,
                    layout, current)
    schedule = common["opt_param_scheduler"]
    if "args" in common:  # in Megatron-LM's units
        schedule = scheduler_state_in_iterations(schedule, config.global_batch_size)
    scheduler.load_state_dict(schedule)
    consumed = common.get("consumed_samples", getattr(common.get("args"), "consumed_train_samples", 0))
    return common["iteration"], consumed


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
        flag = torch.tensor([1.0 if self.received else 0.0], device=current_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
