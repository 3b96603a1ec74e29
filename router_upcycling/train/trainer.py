"""`python -m router_upcycling.train`: set up from a TrainingConfig, then step, log, evaluate and save until done or
signalled (train() is that loop; TrainingRun holds the run's state and its named steps)."""
import itertools
import logging
from typing import Dict, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import track_moe_metrics

from router_upcycling.checkpoint_folder import CheckpointError
from router_upcycling.mcore.checkpoint import iteration_problem, load_model_weights
from router_upcycling.mcore.parallel import current_device, default_peak_flops, initialize_distributed, memory_figures
from router_upcycling.train.build import build_model, wrap_for_training
from router_upcycling.train.checkpointing import (
    ExitSignal, check_save_dir, describe_layout, load_checkpoint, parallel_layout, prepare_save_dir, resumes_in_place,
    save_checkpoint,
)
from router_upcycling.train.config import TrainingConfig
from router_upcycling.train.data import build_datasets, check_batch_sizes, global_batch_iterator, load_tokenizer, parse_blend
from router_upcycling.train.metrics import IntervalTimer, MetricsWriter, RoutingCounter, flops_per_token, train_line
from router_upcycling.train.schedule import build_scheduler
from router_upcycling.train.source import ModelSource
from router_upcycling.train.step import evaluate, make_forward_step, train_step

log = logging.getLogger("router_upcycling.train")


def moe_losses(num_microbatches: int, num_layers: int) -> dict:
    """This step's load-balancing loss, z-loss and LocMoE locality loss, each as megatron-core's tracker reduces it over
    ranks, meaned over layers and micro-batches; resets the tracker."""
    totals = {}
    track_moe_metrics(loss_scale=1.0 / num_microbatches, iteration=0, total_loss_dict=totals, num_layers=num_layers)
    return {name: value.item() for name, value in totals.items()}


class TrainingRun:
    """One run's model, optimizer, data position and reporting, built from a TrainingConfig and its ModelSource."""

    def __init__(self, config: TrainingConfig, source: ModelSource) -> None:
        # files are checked before any process group exists, so bad input fails fast on every rank alike
        parse_blend(config.data_path)
        if config.save:
            check_save_dir(config.save, source.resume_dir)
        initialize_distributed(config.tensor_model_parallel_size, config.pipeline_model_parallel_size,
                               config.expert_model_parallel_size, seed=config.seed)
        self.config, self.source = config, source
        self.device = current_device()
        self.is_writer = torch.distributed.get_rank() == 0
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.num_microbatches = check_batch_sizes(config, self.dp_size)
        self.train_data, self.valid_data = build_datasets(config, load_tokenizer(source.tokenizer_dir), self.dp_size)
        torch.manual_seed(config.seed)
        self.model = build_model(config, source)
        if source.weights_dir:
            problem = iteration_problem(source.weights_dir)
            if problem:
                raise CheckpointError(f"--pretrained-checkpoint {source.weights_dir} is damaged: {problem}")
            load_model_weights(self.model, source.weights_dir)
        self.train_model, self.optimizer = wrap_for_training(self.model, config)
        self.scheduler = build_scheduler(config, self.optimizer)
        self.forward_step_func = make_forward_step(config.seq_length, self.device)
        self.routing = RoutingCounter(self.model, self.device)
        self.exit_signal = ExitSignal()
        self.flops_per_step = (flops_per_token(source.arch, source.moe.num_experts, source.moe.topk, config.seq_length)
                               * config.global_batch_size * config.seq_length)
        self.peak_flops = config.peak_flops or default_peak_flops()
        self.iteration, self.consumed, self.saved_iteration = 0, 0, None
        self.interval: List[Dict] = []  # step results since the last log line
        self.lr = 0.0

    # ---------------------------------------------------------------- the named steps of train()

    def resume(self) -> None:
        """Restore the newest checkpoint of --load (if resuming), give --save its metadata, say what will run."""
        config, source = self.config, self.source
        if source.resume_dir:
            self.iteration, self.consumed = load_checkpoint(config, source.resume_dir, self.model, self.optimizer,
                                                            self.scheduler)
            self.saved_iteration = self.iteration
        in_place = bool(config.save) and resumes_in_place(config.save, source.resume_dir)
        if config.save:
            prepare_save_dir(config.save, source.metadata, source.tokenizer_dir, in_place)
        self.writer = MetricsWriter(config, self.is_writer)
        if in_place:
            self.writer.rewind(self.iteration)  # steps after the checkpoint run again: their old records go
        self.timer = IntervalTimer()
        self.say(f"{'resuming at step ' + str(self.iteration) if source.resume_dir else 'starting'}: {config.train_iters} "
                 f"steps, {self.dp_size} data-parallel ranks x {self.num_microbatches} micro-batches of "
                 f"{config.micro_batch_size} x {config.seq_length} tokens; layout {describe_layout(parallel_layout())}; "
                 f"{'bf16' if config.bf16 else 'fp32'}, {config.transformer_impl} layers, {self.device.type}")

    @property
    def finished(self) -> bool:
        return self.iteration >= self.config.train_iters

    def due(self, interval: Optional[int]) -> bool:
        return bool(interval) and self.iteration % interval == 0

    def step(self) -> None:
        """One optimizer step over the next global batch."""
        config = self.config
        batches = global_batch_iterator(self.train_data, self.consumed, config, self.dp_rank, self.dp_size, self.device)
        result = train_step(self.train_model, self.optimizer, batches, self.forward_step_func, self.num_microbatches,
                            config, self.device)
        self.lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step(1)
        self.iteration += 1
        self.consumed += config.global_batch_size
        result.update(moe_losses(self.num_microbatches, self.model.config.num_layers))
        self.interval.append(result)

    def log(self) -> None:
        """The metrics record of the steps since the last one: stdout, metrics.jsonl, TensorBoard, W&B."""
        config, steps = self.config, len(self.interval)
        elapsed = self.timer.lap()
        world = torch.distributed.get_world_size()
        record = {
            "step": self.iteration,
            "lm_loss": sum(r["lm_loss"] for r in self.interval) / steps,
            "lr": self.lr,
            "grad_norm": self.interval[-1]["grad_norm"],
            "tokens_per_sec": steps * config.global_batch_size * config.seq_length / elapsed,
            "load_balancing_loss": _mean(self.interval, "load_balancing_loss"),
            "z_loss": _mean(self.interval, "z_loss"),
            "locality_loss": _mean(self.interval, "locality_loss"),
            "mfu": steps * self.flops_per_step / elapsed / (self.peak_flops * world) if self.peak_flops else None,
            "eta_sec": (config.train_iters - self.iteration) * elapsed / steps,
            "consumed_samples": self.consumed,
            **self.routing.report(),
            **memory_figures(),
        }
        self.writer.write(record, train_line(record, config.train_iters))
        self.interval = []

    def evaluate(self) -> None:
        """Validation loss over --eval-iters global batches (the same samples every time)."""
        config = self.config
        batches = itertools.chain.from_iterable(
            global_batch_iterator(self.valid_data, g * config.global_batch_size, config, self.dp_rank, self.dp_size,
                                  self.device)
            for g in range(config.eval_iters)
        )
        if config.overlap_param_gather:  # as Megatron-LM: gather every parameter now, no overlap while evaluating
            self.train_model.disable_forward_pre_hook(param_sync=True)
        val_loss = evaluate(self.train_model, batches, self.forward_step_func, self.num_microbatches, config, self.device)
        if config.overlap_param_gather:
            self.train_model.enable_forward_pre_hook()
        self.writer.write({"step": self.iteration, "val_loss": val_loss},
                          f"step {self.iteration} | validation loss {val_loss:.4f}")
        self.timer.lap()  # validation time is not training throughput

    def save(self) -> None:
        """A checkpoint of this step in --save, unless there is no --save or this step is saved already."""
        config = self.config
        if not config.save or self.saved_iteration == self.iteration:
            return
        if config.overlap_param_gather:  # the last update is otherwise gathered only by the next forward pass
            self.train_model.start_param_sync(force_sync=True)
        save_checkpoint(config, self.iteration, self.consumed, self.model, self.optimizer, self.scheduler)
        self.saved_iteration = self.iteration
        self.say(f"saved checkpoint {config.save} at step {self.iteration}")

    def stop_reason(self) -> Optional[str]:
        """Why to save and stop after this step (a signal on any rank, --exit-interval), or None to go on."""
        if self.exit_signal.any_rank_received():
            return f"on a signal ({self.exit_signal.received or 'another rank'})"
        if self.due(self.config.exit_interval):
            return f"(--exit-interval {self.config.exit_interval})"
        return None

    # ----------------------------------------------------------------

    @property
    def validates(self) -> bool:
        return self.valid_data is not None and self.config.eval_iters > 0

    def say(self, line: str) -> None:
        if self.is_writer:
            print(line, flush=True)

    def close(self) -> None:
        self.writer.close()


def train(config: TrainingConfig, source: ModelSource) -> None:
    run = TrainingRun(config, source)
    run.resume()
    while not run.finished:
        run.step()
        if run.due(config.log_interval) or run.finished:
            run.log()
        if run.validates and run.due(config.eval_interval):
            run.evaluate()
        if run.due(config.save_interval):
            run.save()
        reason = run.stop_reason()
        if reason:
            run.save()
            run.say(f"stopping at step {run.iteration} {reason}")
            break
    else:
        run.save()
    run.close()


def _mean(records: List[dict], key: str) -> Optional[float]:
    values = [r[key] for r in records if key in r]
    return sum(values) / len(values) if values else None
