"""`python -m router_upcycling.train`: set up from flags, then step, log, evaluate and save until done or signalled."""
import argparse
import itertools
import logging
from typing import List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import track_moe_metrics

from router_upcycling.cli import setup_logging, user_errors
from router_upcycling.mcore.checkpoint import load_model_weights
from router_upcycling.mcore.parallel import (
    current_device, default_peak_flops, initialize_distributed, memory_figures, shutdown_distributed,
)
from router_upcycling.train.arguments import parse_args
from router_upcycling.train.build import build_model, check_router_flags, resolve_model_source, wrap_for_training
from router_upcycling.train.checkpointing import (
    ExitSignal, check_save_dir, describe_layout, load_checkpoint, parallel_layout, prepare_save_dir, resumes_in_place,
    save_checkpoint,
)
from router_upcycling.train.data import build_datasets, check_batch_sizes, global_batch_iterator, load_tokenizer, parse_blend
from router_upcycling.train.metrics import IntervalTimer, MetricsWriter, RoutingCounter, flops_per_token, train_line
from router_upcycling.train.schedule import build_scheduler
from router_upcycling.train.step import evaluate, make_forward_step, train_step

log = logging.getLogger("router_upcycling.train")


def moe_losses(num_microbatches: int, num_layers: int) -> dict:
    """This step's load-balancing loss, z-loss and LocMoE locality loss, each as megatron-core's tracker reduces it over
    ranks, meaned over layers and micro-batches; resets the tracker."""
    totals = {}
    track_moe_metrics(loss_scale=1.0 / num_microbatches, iteration=0, total_loss_dict=totals, num_layers=num_layers)
    return {name: value.item() for name, value in totals.items()}


def train(args: argparse.Namespace) -> None:
    # files are checked before any process group exists, so bad input fails fast on every rank alike
    source = resolve_model_source(args)
    check_router_flags(args, source.moe)
    parse_blend(args.data_path)
    if args.save:
        check_save_dir(args.save, source.resume_dir)
    initialize_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                           args.expert_model_parallel_size, seed=args.seed)
    device = current_device()
    is_writer = torch.distributed.get_rank() == 0
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    num_microbatches = check_batch_sizes(args, dp_size)

    train_data, valid_data = build_datasets(args, load_tokenizer(source.tokenizer_dir), dp_size)
    torch.manual_seed(args.seed)
    model = build_model(args, source)
    if source.weights_dir:
        load_model_weights(model, source.weights_dir)
    train_model, optimizer = wrap_for_training(model, args)
    scheduler = build_scheduler(args, optimizer)
    iteration, consumed = load_checkpoint(args, source.resume_dir, model, optimizer, scheduler) if source.resume_dir else (0, 0)
    if args.save:
        prepare_save_dir(args.save, source.metadata, source.tokenizer_dir, resumes_in_place(args.save, source.resume_dir))
    if is_writer:
        start = f"resuming at step {iteration}" if source.resume_dir else "starting"
        print(f"{start}: {args.train_iters} steps, {dp_size} data-parallel ranks x {num_microbatches} micro-batches of "
              f"{args.micro_batch_size} x {args.seq_length} tokens; layout {describe_layout(parallel_layout())}; "
              f"{'bf16' if args.bf16 else 'fp32'}, {args.transformer_impl} layers, {device.type}", flush=True)

    forward_step_func = make_forward_step(args.seq_length, device)
    routing = RoutingCounter(model, device)
    writer = MetricsWriter(args, is_writer)
    exit_signal = ExitSignal()
    moe = source.moe
    flops_per_step = flops_per_token(source.hf_config, moe.num_experts, moe.topk, args.seq_length) \
        * args.global_batch_size * args.seq_length
    peak_flops = args.peak_flops or default_peak_flops()
    timer, interval_losses = IntervalTimer(), []
    saved_iteration = iteration if source.resume_dir else None

    def save() -> None:
        nonlocal saved_iteration
        if args.save and saved_iteration != iteration:
            if args.overlap_param_gather:  # the last update is otherwise gathered only by the next forward pass
                train_model.start_param_sync(force_sync=True)
            save_checkpoint(args, iteration, consumed, model, optimizer, scheduler)
            saved_iteration = iteration
            if is_writer:
                print(f"saved checkpoint {args.save} at step {iteration}", flush=True)

    while iteration < args.train_iters:
        batches = global_batch_iterator(train_data, consumed, args, dp_rank, dp_size, device)
        result = train_step(train_model, optimizer, batches, forward_step_func, num_microbatches, args, device)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step(1)
        iteration += 1
        consumed += args.global_batch_size
        result.update(moe_losses(num_microbatches, model.config.num_layers))
        interval_losses.append(result)

        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            elapsed = timer.lap()
            steps = len(interval_losses)
            tokens_per_sec = steps * args.global_batch_size * args.seq_length / elapsed
            world = torch.distributed.get_world_size()
            record = {
                "step": iteration,
                "lm_loss": sum(r["lm_loss"] for r in interval_losses) / steps,
                "lr": lr,
                "grad_norm": result["grad_norm"],
                "tokens_per_sec": tokens_per_sec,
                "load_balancing_loss": _mean(interval_losses, "load_balancing_loss"),
                "z_loss": _mean(interval_losses, "z_loss"),
                "locality_loss": _mean(interval_losses, "locality_loss"),
                "mfu": steps * flops_per_step / elapsed / (peak_flops * world) if peak_flops else None,
                "eta_sec": (args.train_iters - iteration) * elapsed / steps,
                "consumed_samples": consumed,
                **routing.report(),
                **memory_figures(),
            }
            writer.write(record, train_line(record, args.train_iters))
            interval_losses = []

        if valid_data is not None and args.eval_iters > 0 and iteration % args.eval_interval == 0:
            eval_batches = itertools.chain.from_iterable(
                global_batch_iterator(valid_data, g * args.global_batch_size, args, dp_rank, dp_size, device)
                for g in range(args.eval_iters)
            )
            if args.overlap_param_gather:  # as Megatron-LM: gather every parameter now, no overlap while evaluating
                train_model.disable_forward_pre_hook(param_sync=True)
            val_loss = evaluate(train_model, eval_batches, forward_step_func, num_microbatches, args, device)
            if args.overlap_param_gather:
                train_model.enable_forward_pre_hook()
            writer.write({"step": iteration, "val_loss": val_loss}, f"step {iteration} | validation loss {val_loss:.4f}")
            timer.lap()  # validation time is not training throughput

        if args.save_interval and iteration % args.save_interval == 0:
            save()
        if exit_signal.any_rank_received():
            save()
            if is_writer:
                print(f"stopping at step {iteration} on a signal ({exit_signal.received or 'another rank'})", flush=True)
            break
        if args.exit_interval and iteration % args.exit_interval == 0:
            save()
            if is_writer:
                print(f"stopping at step {iteration} (--exit-interval {args.exit_interval})", flush=True)
            break
    else:
        save()
    writer.close()


def _mean(records: List[dict], key: str) -> Optional[float]:
    values = [r[key] for r in records if key in r]
    return sum(values) / len(values) if values else None


def main(argv: Optional[List[str]] = None) -> None:
    setup_logging()
    with user_errors():
        args = parse_args(argv)
        try:
            train(args)
        finally:
            shutdown_distributed()
