"""Speed on this device: the calibration pass of `upcycle`, and training steps through the trainer's own code.

Training steps are train.build.build_model / wrap_for_training and train.step.train_step (megatron-core's schedule,
DDP and optimizer) on random weights and random tokens, with the recipe's settings (selfcheck.sizes). Each
configuration is built, warmed up, timed over --steps steps and freed before the next, so one model at a time
holds the device's memory.

Shapes: b micro-batch, s sequence length.
"""
import argparse
import gc
import itertools
import statistics
import time
from typing import Callable, Dict, Iterator, Optional

import torch
import torch.distributed as dist

from router_upcycling.mcore.parallel import current_device, default_peak_flops, memory_figures, reset_peak_memory
from router_upcycling.selfcheck.sizes import LINEAR, MICRO_BATCHES_PER_STEP, MOR, Size, recipe_training_args, speed_options


def synthetic_batches(micro_batch_size: int, seq_length: int, vocab_size: int, device, seed: int = 0) -> Iterator[Dict]:
    """One batch of random tokens, repeated: tokens, labels, loss_mask, position_ids, each [b, s], on `device`."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (micro_batch_size, seq_length + 1), generator=generator)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(micro_batch_size, seq_length),
             "position_ids": torch.arange(seq_length)[None].expand(micro_batch_size, seq_length)}
    return itertools.repeat({name: tensor.to(device) for name, tensor in batch.items()})


def calibration_speed(size: Size) -> dict:
    """Tokens per second of router_upcycling.init.calibration's average-key pass over a random dense model of the
    size in float32 (as `upcycle` runs it), after one warm-up batch; tokenization by a small local tokenizer included."""
    from transformers import Qwen2ForCausalLM

    from router_upcycling.convert.upcycle import CalibrationSettings
    from router_upcycling.init.calibration import average_attention_keys, default_batch_size
    from router_upcycling.testing import SAMPLE_TEXT, train_tokenizer

    device = current_device()
    tokenizer = train_tokenizer()
    documents = itertools.repeat(" ".join(SAMPLE_TEXT))
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: the pass would otherwise time copying it there and back
        model = Qwen2ForCausalLM(size.qwen2_config())
    batch_size = default_batch_size(size.calib_seq_length, device)

    def average_keys(num_tokens: int) -> None:
        average_attention_keys(model, tokenizer, documents, num_tokens, size.calib_seq_length, progress=False)

    average_keys(batch_size * size.calib_seq_length)
    start = time.perf_counter()
    average_keys(size.calib_tokens)  # returns the keys on the CPU: the device has finished
    seconds = time.perf_counter() - start
    tokens_per_sec = size.calib_tokens / seconds
    paper_tokens = CalibrationSettings().tokens
    return {"tokens": size.calib_tokens, "seq_length": size.calib_seq_length, "batch_size": batch_size,
            "seconds": seconds, "tokens_per_sec": tokens_per_sec, "paper_tokens": paper_tokens,
            "paper_tokens_minutes": paper_tokens / tokens_per_sec / 60}


def time_training_steps(size: Size, moe_block: dict, args: argparse.Namespace, steps: int, warmup: int):
    """(seconds of each timed step after `warmup` untimed ones, memory_figures() after them) of a freshly built model."""
    from megatron.core import parallel_state

    from router_upcycling.mcore.model import MoESettings
    from router_upcycling.train.build import ModelSource, build_model, wrap_for_training
    from router_upcycling.train.metrics import IntervalTimer
    from router_upcycling.train.step import make_forward_step, train_step

    device = current_device()
    hf_config = size.hf_config
    metadata = {"hf_config": hf_config, "moe": MoESettings(**moe_block).to_dict(hf_config)}
    torch.manual_seed(0)
    model = build_model(args, ModelSource(metadata, None, "", None))
    train_model, optimizer = wrap_for_training(model, args)
    num_microbatches = args.global_batch_size // (args.micro_batch_size * parallel_state.get_data_parallel_world_size())
    batches = synthetic_batches(args.micro_batch_size, args.seq_length, hf_config["vocab_size"], device)
    forward_step_func = make_forward_step(args.seq_length, device)
    timer, times = IntervalTimer(), []
    for step in range(warmup + steps):
        train_step(train_model, optimizer, batches, forward_step_func, num_microbatches, args, device)
        elapsed = timer.lap()
        if step >= warmup:
            times.append(elapsed)
    return times, memory_figures()


def measure(name: str, size: Size, moe_block: dict, args: argparse.Namespace, steps: int, warmup: int,
            peak_flops: Optional[float]) -> dict:
    """One configuration's figures per GPU (rank 0's timings; every rank steps in lockstep)."""
    from router_upcycling.train.metrics import flops_per_token

    figures = {"name": name, "router": moe_block["router"], "moe_grouped_gemm": args.moe_grouped_gemm}
    reset_peak_memory()
    try:
        times, memory = time_training_steps(size, moe_block, args, steps, warmup)
    except torch.OutOfMemoryError as error:  # a size too large for one GPU: reported, the other figures still come
        return {**figures, "error": f"out of memory: {str(error).splitlines()[0]}"}
    finally:
        gc.collect()  # the model, DDP buffers and optimizer reference each other: free them before the next one
        torch.cuda.empty_cache()
    step = statistics.median(times)
    tokens_per_sec = args.micro_batch_size * args.seq_length * MICRO_BATCHES_PER_STEP / step
    flops_per_sec = flops_per_token(size.hf_config, moe_block["num_experts"], moe_block["topk"], args.seq_length) * tokens_per_sec
    return {**figures, "step_time_median_s": step, "step_time_min_s": min(times), "tokens_per_sec_per_gpu": tokens_per_sec,
            "tflops_per_gpu": flops_per_sec / 1e12, "mfu": flops_per_sec / peak_flops if peak_flops else None,
            "peak_memory_mb": memory.get("gpu_max_allocated_mb", memory["host_memory_mb"]),
            "memory_kind": "GPU max allocated" if "gpu_max_allocated_mb" in memory else "host resident"}


def throughput(size: Size, steps: int, warmup: int, peak_flops: Optional[float], report: Callable[[str], None]) -> dict:
    """MoR and the linear router with the recipe's settings, and MoR without grouped GEMM where the recipe uses it,
    on every rank of this job (data parallel)."""
    world_size = dist.get_world_size()
    args, notes = recipe_training_args(size, world_size)
    peak_flops = peak_flops or default_peak_flops()
    configurations = [("mor", MOR, args), ("linear", LINEAR, args)]
    if args.moe_grouped_gemm:
        configurations.append(("mor, grouped GEMM off", MOR, argparse.Namespace(**{**vars(args), "moe_grouped_gemm": False})))
    results = []
    for name, moe_block, config_args in configurations:
        results.append(measure(name, size, moe_block, config_args, steps, warmup, peak_flops))
        report(describe(results[-1], world_size))
    by_name = {r["name"]: r for r in results if "error" not in r}
    return {"world_size": world_size, "options": speed_options(args), "notes": notes, "peak_flops": peak_flops,
            "steps": steps, "warmup": warmup, "configurations": results,
            "mor_over_linear": step_ratio(by_name, "mor", "linear"),
            "grouped_gemm_off_over_on": step_ratio(by_name, "mor, grouped GEMM off", "mor")}


def step_ratio(by_name: dict, numerator: str, denominator: str) -> Optional[float]:
    if numerator in by_name and denominator in by_name:
        return by_name[numerator]["step_time_median_s"] / by_name[denominator]["step_time_median_s"]
    return None


def describe(figures: dict, world_size: int) -> str:
    where = f"{world_size} process{'es' if world_size > 1 else ''}"
    if "error" in figures:
        return f"{figures['name']} ({where}): {figures['error']}"
    mfu = f", MFU {100 * figures['mfu']:.1f}%" if figures["mfu"] is not None else ""
    return (f"{figures['name']} ({where}): {1000 * figures['step_time_median_s']:.1f} ms/step, "
            f"{figures['tokens_per_sec_per_gpu']:,.0f} tokens/s per GPU, {figures['tflops_per_gpu']:.2f} TFLOP/s per GPU"
            f"{mfu}, {figures['memory_kind']} {figures['peak_memory_mb']:,.0f} MB")
