"""Command-line flags of `python -m router_upcycling.train` (Megatron-LM's names) and `--config FILE.yaml`.

A YAML config holds the same flags as keys (dashes or underscores); flags given on the command
line win over the file. Validation that needs no files happens here and raises TrainError.
"""
import argparse
import os
from typing import List, Optional

from router_upcycling.errors import UserError
from router_upcycling.mcore.parallel import transformer_engine_available, unsupported_here
from router_upcycling.mcore.routers import ROUTER_TYPES

class TrainError(UserError):
    """Bad training flags, config, data or checkpoint."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m router_upcycling.train",
        description="Train an upcycled (or from-scratch) MoE with megatron-core. Run it directly, under torchrun "
        "or under srun. With --load/--save it resumes automatically: model, optimizer, scheduler, RNG and the data "
        "position come back from the newest complete checkpoint in --load. Flag names follow Megatron-LM.",
    )
    add = parser.add_argument
    add("--config", help="YAML file whose keys are these flags (dashes or underscores); command-line flags win")

    g = parser.add_argument_group("model and checkpoints")
    g.add_argument("--pretrained-checkpoint", help="upcycled checkpoint folder (from `upcycle`): weights and architecture, "
                   "used only when --load holds no checkpoint yet")
    g.add_argument("--load", help="resume from the newest complete checkpoint in this folder when there is one")
    g.add_argument("--no-load-optim", action="store_true", help="when resuming, take the model, schedule and data "
                   "position but start the optimizer afresh (Megatron-LM's flag)")
    g.add_argument("--save", help="write checkpoints (iter_XXXXXXX), metrics.jsonl and the tokenizer here")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action=argparse.BooleanOptionalAction, default=False, help="save the distributed optimizer "
                   "state in megatron-core's fully_reshardable format (gathered per data-parallel group while saving), "
                   "which resumes on any tensor/pipeline/expert layout; the default dp_reshardable format saves "
                   "without communication but resumes only with the same tensor/pipeline/expert sizes")
    g.add_argument("--from-scratch", action="store_true", help="random weights (normal, std 0.02) for the paper's "
                   "'MoE from scratch' baseline; needs --model-config")
    g.add_argument("--model-config", help="Hugging Face model folder giving the dense architecture and tokenizer (--from-scratch)")
    g.add_argument("--moe-router-type", choices=ROUTER_TYPES, default="linear", help="router for --from-scratch (default "
                   "linear; locmoe: LocMoE's parameter-free GrAP gate, which needs the hidden size to be a multiple of "
                   "--num-experts)")
    g.add_argument("--num-experts", type=int, default=8, help="experts per layer for --from-scratch (default 8)")
    g.add_argument("--moe-router-topk", type=int, default=2, help="experts per token for --from-scratch (default 2)")
    g.add_argument("--num-routers", type=int, help="Mixture-of-Routers router count for --from-scratch --moe-router-type mor "
                   "(default: the number of experts)")
    g.add_argument("--init-method-std", type=float, default=0.02, help="std of the random normal init for --from-scratch (default 0.02)")

    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", help="indexed dataset prefix(es) (PREFIX.bin/.idx), or a weighted blend: "
                   "'0.3 PREFIX_A 0.7 PREFIX_B'")
    g.add_argument("--split", default="969,30,1", help="train,validation,test proportions of the documents (default 969,30,1)")
    g.add_argument("--data-cache-path", help="folder for the dataset index caches (default: beside the data)")
    g.add_argument("--seq-length", type=int, default=4096, help="tokens per sample (default 4096)")
    g.add_argument("--micro-batch-size", type=int, default=4, help="samples per forward pass per data-parallel rank (default 4)")
    g.add_argument("--global-batch-size", type=int, default=1024, help="samples per optimizer step over all ranks; "
                   "gradient accumulation = global / (micro x data-parallel size) (default 1024)")
    g.add_argument("--eod-mask-loss", action="store_true", help="no loss on end-of-document tokens (Megatron-LM's flag; default off)")

    g = parser.add_argument_group("parallelism, precision and speed (Megatron-LM's flags; the same code runs on CPU and GPU)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="tensor parallel size (default 1); "
                   "with MoE it needs --sequence-parallel")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="pipeline parallel size, 1F1B schedule "
                   "(default 1); must divide the number of layers")
    g.add_argument("--expert-model-parallel-size", type=int, default=1, help="expert parallel size (default 1); "
                   "must divide the number of experts")
    g.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=False, help="split activations outside attention over the "
                   "tensor-parallel group (ignored when the tensor-parallel size is 1, as Megatron-LM)")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                   help="bfloat16 weights and activations, float32 main weights in the optimizer and float32 gradient "
                   "reduction (default off: float32; --no-bf16 overrides a config)")
    g.add_argument("--use-distributed-optimizer", action=argparse.BooleanOptionalAction, default=False, help="shard the optimizer state and float32 "
                   "main weights over the data-parallel ranks (ZeRO-1)")
    g.add_argument("--overlap-grad-reduce", action=argparse.BooleanOptionalAction, default=False, help="reduce gradient buckets while the backward "
                   "pass still runs")
    g.add_argument("--overlap-param-gather", action=argparse.BooleanOptionalAction, default=False, help="all-gather updated parameters during the "
                   "next forward pass (needs --use-distributed-optimizer and --overlap-grad-reduce)")
    g.add_argument("--transformer-impl", choices=("local", "transformer_engine"), default=None,
                   help="layer implementation: transformer_engine (default where it imports and CUDA is present) or "
                   "local (megatron-core's torch modules; the only choice on CPU)")
    g.add_argument("--moe-grouped-gemm", action=argparse.BooleanOptionalAction, default=False, help="run the local experts as one grouped GEMM (CUDA)")
    g.add_argument("--moe-token-dispatcher-type", choices=("allgather", "alltoall"), default="allgather",
                   help="how tokens reach their experts (default allgather; alltoall is faster with expert parallelism)")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), help="recompute activations in the "
                   "backward pass: full transformer layers, or selective (core attention only)")
    g.add_argument("--recompute-method", choices=("uniform", "block"), help="with full recompute: uniform = checkpoint "
                   "groups of --recompute-num-layers layers, block = recompute the first --recompute-num-layers layers "
                   "of each pipeline stage")
    g.add_argument("--recompute-num-layers", type=int, help="layers per group (uniform) or per stage (block) for full recompute")

    g = parser.add_argument_group("optimization")
    g.add_argument("--train-iters", type=int, help="optimizer steps to train for (required)")
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    g.add_argument("--min-lr", type=float, default=0.0, help="floor of the learning rate (default 0)")
    g.add_argument("--lr-warmup-iters", type=int, help="linear warmup steps from 0 to --lr (Megatron-LM starts at 0)")
    g.add_argument("--lr-warmup-fraction", type=float, help="warmup as a fraction of --train-iters (instead of --lr-warmup-iters)")
    g.add_argument("--lr-decay-style", choices=("constant", "cosine", "linear", "step"), default="step",
                   help="after warmup: constant, cosine or linear to --min-lr at --train-iters, or step: constant, then "
                   "x --lr-step-decay-factor at each --lr-step-decay-fractions (the paper's schedule; default)")
    g.add_argument("--lr-step-decay-fractions", type=float, nargs="+", default=[0.8, 0.9],
                   help="fractions of --train-iters at which the step style multiplies the rate (default 0.8 0.9)")
    g.add_argument("--lr-step-decay-factor", type=float, default=0.316, help="step style factor (default 0.316)")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1 (default 0.9)")
    g.add_argument("--adam-beta2", type=float, default=0.95, help="Adam beta2 (default 0.95)")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon (default 1e-8)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="decoupled weight decay, not applied to biases and "
                   "1-D parameters (norms), as Megatron-LM (default 0.1)")
    g.add_argument("--clip-grad", type=float, default=1.0, help="clip the global gradient norm to this; 0 = no clipping (default 1.0)")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.01, help="load-balancing loss coefficient (default 0.01; "
                   "Megatron-LM's default is 0)")
    g.add_argument("--moe-z-loss-coeff", type=float, help="router z-loss coefficient (default: none)")
    g.add_argument("--locmoe-locality-coeff", type=float, default=0.0, help="locmoe router only: coefficient mu of "
                   "LocMoE's locality loss, read with data parallelism as mu * KL(mean over the micro-batch's tokens of "
                   "the softmax over all experts || uniform) (docs/method.md; default 0 = off)")
    g.add_argument("--seed", type=int, default=1234, help="seed for initialisation and data order (default 1234)")

    g = parser.add_argument_group("intervals and logging")
    g.add_argument("--save-interval", type=int, help="save a checkpoint every N steps (and always at the end)")
    g.add_argument("--exit-interval", type=int, help="save and exit when the step count is a multiple of N")
    g.add_argument("--log-interval", type=int, default=100, help="print and record metrics every N steps (default 100)")
    g.add_argument("--eval-interval", type=int, default=1000, help="validation loss every N steps (default 1000)")
    g.add_argument("--eval-iters", type=int, default=100, help="global batches per validation (default 100); 0 = none")
    g.add_argument("--tensorboard-dir", help="write TensorBoard scalars here (needs the tensorboard package)")
    g.add_argument("--wandb-project", help="log to Weights & Biases (offline mode when WANDB_API_KEY is unset)")
    g.add_argument("--wandb-exp-name", help="W&B run name (default: the --save folder's name)")
    g.add_argument("--peak-flops", type=float, help="peak FLOP/s per device for the MFU estimate (default: H100 bf16 989e12 "
                   "on CUDA; no MFU on CPU unless given)")
    return parser


def config_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """The YAML file's values as argparse defaults, keyed by destination; unknown keys are errors."""
    import yaml

    if not os.path.isfile(path):
        raise TrainError(f"config file not found: {path}")
    with open(path) as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise TrainError(f"config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise TrainError(f"config {path} must be a mapping of flag names to values")
    known = {action.dest for action in parser._actions}
    defaults = {}
    for key, value in values.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in known or dest in ("help", "config"):
            raise TrainError(f"config {path}: unknown key {key!r} (keys are this command's flag names)")
        defaults[dest] = value
    return defaults


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**config_defaults(parser, args.config))
        args = parser.parse_args(argv)
    if args.data_path:  # a YAML string or one quoted argument holds the blend as one string
        args.data_path = [part for item in ([args.data_path] if isinstance(args.data_path, str) else args.data_path)
                          for part in str(item).split()]
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Settings that are wrong whatever the files say."""
    if args.train_iters is None or args.train_iters < 1:
        raise TrainError("--train-iters is required and must be at least 1")
    if not args.data_path:
        raise TrainError("--data-path is required (indexed dataset prefix or weighted blend)")
    if args.from_scratch and args.pretrained_checkpoint:
        raise TrainError("--from-scratch and --pretrained-checkpoint exclude each other")
    if args.from_scratch and not args.model_config:
        raise TrainError("--from-scratch needs --model-config HF_DIR (architecture and tokenizer)")
    if not (args.from_scratch or args.pretrained_checkpoint or args.load):
        raise TrainError("give --pretrained-checkpoint DIR, --from-scratch --model-config HF_DIR, or --load DIR to resume")
    if args.tensor_model_parallel_size == 1:
        args.sequence_parallel = False  # as Megatron-LM: nothing to split over
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be at least 1")
    if args.tensor_model_parallel_size > 1 and not args.sequence_parallel:
        raise TrainError("MoE with tensor parallelism needs --sequence-parallel (megatron-core requires it)")
    if args.overlap_param_gather and not (args.use_distributed_optimizer and args.overlap_grad_reduce):
        raise TrainError("--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce")
    if args.recompute_granularity == "full" and not (args.recompute_method and args.recompute_num_layers):
        raise TrainError("--recompute-granularity full needs --recompute-method uniform|block and --recompute-num-layers N")
    if args.recompute_granularity != "full" and (args.recompute_method or args.recompute_num_layers):
        raise TrainError("--recompute-method and --recompute-num-layers apply only to --recompute-granularity full")
    if args.transformer_impl is None:
        args.transformer_impl = "transformer_engine" if transformer_engine_available() else "local"
    refusals = unsupported_here(vars(args))
    if refusals:
        raise TrainError(refusals[0])
    for name in ("seq_length", "micro_batch_size", "global_batch_size", "log_interval", "eval_interval"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr_warmup_iters is not None and args.lr_warmup_fraction is not None:
        raise TrainError("give --lr-warmup-iters or --lr-warmup-fraction, not both")
    if args.lr_warmup_fraction is not None and not 0 <= args.lr_warmup_fraction < 1:
        raise TrainError("--lr-warmup-fraction must be in [0, 1)")
    if not 0 <= args.min_lr <= args.lr:
        raise TrainError("--min-lr must be between 0 and --lr")
    if args.locmoe_locality_coeff < 0:
        raise TrainError("--locmoe-locality-coeff must be at least 0")
    if any(not 0 < f < 1 for f in args.lr_step_decay_fractions):
        raise TrainError("--lr-step-decay-fractions must lie strictly between 0 and 1")


def warmup_iters(args: argparse.Namespace) -> int:
    if args.lr_warmup_iters is not None:
        return args.lr_warmup_iters
    return int(round((args.lr_warmup_fraction or 0.0) * args.train_iters))
