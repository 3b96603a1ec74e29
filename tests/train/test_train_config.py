"""The shipped training recipes parse, and a YAML config yields to command-line flags."""
import math
import os

import pytest
import yaml

from router_upcycling.train.config import TrainError, parse_args
from router_upcycling.train.data import microbatch_indices
from router_upcycling.train.schedule import StepDecayParamScheduler, build_scheduler

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "train")
REQUIRED = ["--pretrained-checkpoint", "CKPT", "--data-path", "0.3", "A", "0.7", "B"]


class FakeOptimizer:
    param_groups = [{"lr": 0.0, "wd_mult": 1.0}]


@pytest.mark.parametrize("name", ["qwen1.5_8x0.5b_mor.yaml", "qwen1.5_8x0.5b_vanilla.yaml"])
def test_paper_recipes_follow_section_4_1(name):
    args = parse_args(["--config", os.path.join(CONFIGS, name), "--transformer-impl", "local", "--no-moe-grouped-gemm", *REQUIRED])
    with open(os.path.join(CONFIGS, name)) as f:
        recipe = yaml.safe_load(f)
    assert recipe["bf16"] is True and args.bf16
    # the CUDA-only speed options, turned off on the command line so the recipe parses on CPU
    assert recipe["transformer-impl"] == "transformer_engine" and recipe["moe-grouped-gemm"] is True
    assert args.use_distributed_optimizer and args.overlap_grad_reduce and args.overlap_param_gather
    assert (args.micro_batch_size, args.global_batch_size, args.seq_length, args.train_iters) == (4, 1024, 4096, 25600)
    assert args.global_batch_size // (args.micro_batch_size * 64) == 4
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size) == (1, 1, 1)
    scheduler = build_scheduler(args, FakeOptimizer())
    assert scheduler.decay_points == [20480, 23040]
    lrs = {}
    for step in (0, 128, 256, 20479, 20480, 23040, 25599):
        scheduler.num_steps = step
        lrs[step] = scheduler.get_lr({})
    assert lrs[0] == 0 and lrs[128] == pytest.approx(args.lr / 2) and lrs[256] == lrs[20479] == args.lr
    assert lrs[20480] == pytest.approx(args.lr * 0.316) and lrs[23040] == lrs[25599] == pytest.approx(args.lr * 0.316**2)
    assert args.data_path == ["0.3", "A", "0.7", "B"]


@pytest.mark.parametrize("flags,message", [
    (["--transformer-impl", "transformer_engine"], "Transformer Engine kernels need CUDA"),
    (["--moe-grouped-gemm"], "grouped GEMM kernels need CUDA"),
    (["--tensor-model-parallel-size", "2"], "needs --sequence-parallel"),
    (["--overlap-param-gather", "--use-distributed-optimizer"], "needs --use-distributed-optimizer and --overlap-grad-reduce"),
    (["--recompute-granularity", "full"], "needs --recompute-method"),
    (["--recompute-method", "block"], "apply only to --recompute-granularity full"),
])
def test_settings_that_cannot_run_are_refused_before_anything_starts(flags, message):
    with pytest.raises(TrainError, match=message):
        parse_args([*REQUIRED, "--train-iters", "5", *flags])


def test_cuda_only_options_are_refused_on_cpu_in_the_paper_recipe():
    with pytest.raises(TrainError, match="Transformer Engine kernels need CUDA; use --transformer-impl local"):
        parse_args(["--config", os.path.join(CONFIGS, "qwen1.5_8x0.5b_mor.yaml"), *REQUIRED])


def test_tiny_cpu_config_and_command_line_precedence():
    args = parse_args(["--config", os.path.join(CONFIGS, "tiny_cpu.yaml"), *REQUIRED, "--train-iters", "5"])
    assert (args.seq_length, args.micro_batch_size, args.global_batch_size, args.log_interval) == (64, 2, 8, 1)
    assert args.train_iters == 5 and args.transformer_impl == "local" and not args.bf16


def test_step_schedule_is_megatron_scheduler_with_state():
    args = parse_args([*REQUIRED, "--train-iters", "10", "--lr", "1.0", "--lr-warmup-fraction", "0.2"])
    optimizer = FakeOptimizer()
    scheduler = build_scheduler(args, optimizer)
    assert isinstance(scheduler, StepDecayParamScheduler)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        scheduler.step(1)
    assert seen == pytest.approx([0, 0.5, 1, 1, 1, 1, 1, 1, 0.316, 0.316**2])
    assert scheduler.state_dict()["num_steps"] == 10 and math.isclose(optimizer.param_groups[0]["weight_decay"], 0.1)


def test_microbatches_cover_the_global_batch_whatever_the_data_parallel_size():
    one = microbatch_indices(16, 8, 2, 0, 1)
    two = microbatch_indices(16, 8, 2, 0, 2) + microbatch_indices(16, 8, 2, 1, 2)
    assert sorted(map(tuple, one)) == sorted(map(tuple, two)) and sorted(sum(one, [])) == list(range(16, 24))
