"""Speed on this device: the calibration pass of `upcycle`, and training steps through the trainer's own code.

Training steps are train.build.build_model / wrap_for_training and train.step.train_step (megatron-core's schedule,
DDP and optimizer) on random weights and random tokens, with the recipe's settings (selfcheck.sizes). Every
configuration is built first; then their steps are timed interleaved (each round one step of each, the order
alternating), so that load on a shared machine hits all of them alike and the MoR / linear ratio is a ratio of
neighbouring steps. Where the configurations do not all fit in the device's memory at once, each is built, timed and
freed in turn, and the report says so.

Shapes: b micro-batch, s sequence length.
"""
import gc
import itertools
import statistics
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from router_upcycling.mcore.parallel import current_device, default_peak_flops, memory_figures, reset_peak_memory
from router_upcycling.selfcheck.sizes import LINEAR, MICRO_BATCHES_PER_STEP, MOR, Size, recipe_training_config, speed_options
from router_upcycling.settings.moe import MoESettings
from router_upcycling.train.config import TrainingConfig

# the configurations' names in the report: the routers', and MoR without grouped GEMM
MOR_NAME, LINEAR_NAME, NO_GROUPED_GEMM_NAME = MOR.router, LINEAR.router, f"{MOR.router}, grouped GEMM off"


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


class TimedConfiguration:
    """One configuration's model, DDP wrapper, optimizer and batches, ready to step."""

    def __init__(self, name: str, size: Size, moe: MoESettings, config: TrainingConfig) -> None:
        from megatron.core import parallel_state

        from router_upcycling.train.build import build_model, wrap_for_training
        from router_upcycling.train.source import ModelSource
        from router_upcycling.train.step import make_forward_step

        self.name, self.moe, self.config, self.times = name, moe, config, []
        self.device = current_device()
        arch = size.arch
        source = ModelSource({"hf_config": size.hf_config, "moe": moe.to_dict(arch)}, arch, moe, None, "", None)
        torch.manual_seed(0)
        self.model, self.optimizer = wrap_for_training(build_model(config, source), config)
        self.num_microbatches = config.global_batch_size // (config.micro_batch_size
                                                             * parallel_state.get_data_parallel_world_size())
        self.batches = synthetic_batches(config.micro_batch_size, config.seq_length, arch.vocab_size, self.device)
        self.forward_step_func = make_forward_step(config.seq_length, self.device)

    def step(self) -> float:
        """Seconds of one training step (the device synchronised before and after)."""
        from router_upcycling.train.metrics import IntervalTimer
        from router_upcycling.train.step import train_step

        timer = IntervalTimer()
        train_step(self.model, self.optimizer, self.batches, self.forward_step_func, self.num_microbatches, self.config,
                   self.device)
        return timer.lap()

    def release(self) -> None:
        del self.model, self.optimizer
        gc.collect()  # the model, DDP buffers and optimizer reference each other: free them before the next one
        torch.cuda.empty_cache()


def time_interleaved(timed: List[TimedConfiguration], steps: int, warmup: int) -> None:
    """`warmup` untimed and `steps` timed rounds; each round one step of every configuration, the order reversed
    from one round to the next."""
    order = list(timed)
    for round_index in range(warmup + steps):
        for configuration in order:
            elapsed = configuration.step()
            if round_index >= warmup:
                configuration.times.append(elapsed)
        order.reverse()


def build_all(specs: List[Tuple[str, MoESettings, TrainingConfig]], size: Size) -> Optional[List[TimedConfiguration]]:
    """Every configuration built and stepped once, or None when they do not fit in the device's memory together."""
    built: List[TimedConfiguration] = []
    try:
        for name, moe, config in specs:
            built.append(TimedConfiguration(name, size, moe, config))
            built[-1].step()  # the first step allocates the optimizer state and the activations
    except torch.OutOfMemoryError:
        for configuration in built:
            configuration.release()
        return None
    return built


def measure_all(specs: List[Tuple[str, MoESettings, TrainingConfig]], size: Size, steps: int, warmup: int,
                peak_flops: Optional[float]) -> Tuple[List[dict], bool]:
    """(figures of each configuration, whether their steps were interleaved)."""
    reset_peak_memory()
    built = build_all(specs, size)
    if built is not None:
        time_interleaved(built, steps, warmup)
        memory = memory_figures()  # all configurations together: the peak is theirs jointly
        results = [figures(c, size, memory, peak_flops) for c in built]
        for configuration in built:
            configuration.release()
        return results, True
    results = []
    for name, moe, config in specs:  # one at a time: each configuration's own peak
        reset_peak_memory()
        try:
            configuration = TimedConfiguration(name, size, moe, config)
            time_interleaved([configuration], steps, warmup)
        except torch.OutOfMemoryError as error:  # a size too large for one GPU: reported, the others still come
            results.append({"name": name, "router": moe.router, "moe_grouped_gemm": config.moe_grouped_gemm,
                            "error": f"out of memory: {str(error).splitlines()[0]}"})
            gc.collect()
            torch.cuda.empty_cache()
            continue
        results.append(figures(configuration, size, memory_figures(), peak_flops))
        configuration.release()
    return results, False


def figures(configuration: TimedConfiguration, size: Size, memory: dict, peak_flops: Optional[float]) -> dict:
    """One configuration's figures per GPU (rank 0's timings; every rank steps in lockstep)."""
    from router_upcycling.train.metrics import flops_per_token

    config, moe, times = configuration.config, configuration.moe, configuration.times
    step = statistics.median(times)
    tokens_per_sec = config.micro_batch_size * config.seq_length * MICRO_BATCHES_PER_STEP / step
    flops_per_sec = flops_per_token(size.arch, moe.num_experts, moe.topk, config.seq_length) * tokens_per_sec
    return {"name": configuration.name, "router": moe.router, "moe_grouped_gemm": config.moe_grouped_gemm,
            "step_time_median_s": step, "step_time_min_s": min(times), "step_times_s": times,
            "tokens_per_sec_per_gpu": tokens_per_sec, "tflops_per_gpu": flops_per_sec / 1e12,
            "mfu": flops_per_sec / peak_flops if peak_flops else None,
            "peak_memory_mb": memory.get("gpu_max_allocated_mb", memory["host_memory_mb"]),
            "memory_kind": "GPU max allocated" if "gpu_max_allocated_mb" in memory else "host resident"}


def throughput(size: Size, steps: int, warmup: int, peak_flops: Optional[float], report: Callable[[str], None]) -> dict:
    """MoR and the linear router with the recipe's settings, and MoR without grouped GEMM where the recipe uses it,
    on every rank of this job (data parallel)."""
    world_size = dist.get_world_size()
    config, notes = recipe_training_config(size, world_size)
    peak_flops = peak_flops or default_peak_flops()
    specs = [(MOR_NAME, MOR, config), (LINEAR_NAME, LINEAR, config)]
    if config.moe_grouped_gemm:
        specs.append((NO_GROUPED_GEMM_NAME, MOR, config.replace(moe_grouped_gemm=False)))
    results, interleaved = measure_all(specs, size, steps, warmup, peak_flops)
    if not interleaved:
        notes.append("the configurations do not fit in memory together: each was timed on its own, one after the other")
    for result in results:
        report(describe(result, world_size))
    by_name = {r["name"]: r for r in results if "error" not in r}
    mor_over_linear = step_ratio(by_name, MOR_NAME, LINEAR_NAME)
    if mor_over_linear:
        report(f"MoR / linear {mor_over_linear['median']:.3f} (per-round ratios {mor_over_linear['low']:.3f} to "
               f"{mor_over_linear['high']:.3f}, {'interleaved' if interleaved else 'timed apart'})")
    gemm = step_ratio(by_name, NO_GROUPED_GEMM_NAME, MOR_NAME)
    return {"world_size": world_size, "options": speed_options(config), "notes": notes, "peak_flops": peak_flops,
            "steps": steps, "warmup": warmup, "interleaved": interleaved, "configurations": results,
            "mor_over_linear": mor_over_linear["median"] if mor_over_linear else None,
            "mor_over_linear_spread": [mor_over_linear["low"], mor_over_linear["high"]] if mor_over_linear else None,
            "grouped_gemm_off_over_on": gemm["median"] if gemm else None}


def step_ratio(by_name: dict, numerator: str, denominator: str) -> Optional[dict]:
    """The median of the per-round step-time ratios, and their interquartile range (`low`, `high`)."""
    if numerator not in by_name or denominator not in by_name:
        return None
    ratios = [a / b for a, b in zip(by_name[numerator]["step_times_s"], by_name[denominator]["step_times_s"])]
    if len(ratios) < 2:
        return {"median": ratios[0], "low": ratios[0], "high": ratios[0]}
    low, _, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"median": statistics.median(ratios), "low": low, "high": high}


def describe(figures: dict, world_size: int) -> str:
    where = f"{world_size} process{'es' if world_size > 1 else ''}"
    if "error" in figures:
        return f"{figures['name']} ({where}): {figures['error']}"
    mfu = f", MFU {100 * figures['mfu']:.1f}%" if figures["mfu"] is not None else ""
    return (f"{figures['name']} ({where}): {1000 * figures['step_time_median_s']:.1f} ms/step, "
            f"{figures['tokens_per_sec_per_gpu']:,.0f} tokens/s per GPU, {figures['tflops_per_gpu']:.2f} TFLOP/s per GPU"
            f"{mfu}, {figures['memory_kind']} {figures['peak_memory_mb']:,.0f} MB")
