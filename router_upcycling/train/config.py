"""The run, typed: TrainingConfig holds every setting of `python -m router_upcycling.train` and is what build, step,
data, checkpointing and metrics read. The command line is only its edge: each field names its flag (Megatron-LM's
names), help and group, and the parser is built from the fields, so a default is written once. The self-check and the
benchmarks construct a TrainingConfig directly.

A YAML `--config` holds the same flags as keys (dashes or underscores); flags given on the command line win over
the file. Pure Python: the checks that need no files and no device run before torch is imported.
"""
import argparse
import dataclasses
import os
from typing import List, Optional

from router_upcycling.cli import OneLineErrorParser
from router_upcycling.errors import UserError
from router_upcycling.settings.routers import BASELINE_ROUTER, router_names, routers_help


class TrainError(UserError):
    """Bad training flags, config, data or checkpoint."""


MODEL, DATA, SPEED, OPTIMIZATION, LOGGING = (
    "model and checkpoints", "data",
    "parallelism, precision and speed (Megatron-LM's flags; the same code runs on CPU and GPU)",
    "optimization", "intervals and logging",
)


def option(flag: str, group: str, help: str, default=None, **argparse_keywords):
    """A field that is also a command-line flag."""
    keywords = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return dataclasses.field(**keywords, metadata={"flag": flag, "group": group, "help": help, "argparse": argparse_keywords})


def switch(flag: str, group: str, help: str, negatable: bool = True):
    """A boolean flag, off by default: --flag / --no-flag (or a plain --flag where Megatron-LM has no --no- form)."""
    action = argparse.BooleanOptionalAction if negatable else "store_true"
    return option(flag, group, help, False, action=action)


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """Every setting of a training run (docs/cluster.md). Values are checked by `check()`."""

    # model and checkpoints
    pretrained_checkpoint: Optional[str] = option("--pretrained-checkpoint", MODEL, "upcycled checkpoint folder (from "
        "`upcycle`): weights and architecture, used only when --load holds no checkpoint yet")
    load: Optional[str] = option("--load", MODEL, "resume from the newest complete checkpoint in this folder when there is one")
    no_load_optim: bool = switch("--no-load-optim", MODEL, "when resuming, take the model, schedule and data position but "
        "start the optimizer afresh (Megatron-LM's flag)", negatable=False)
    save: Optional[str] = option("--save", MODEL, "write checkpoints (iter_XXXXXXX), metrics.jsonl and the tokenizer here")
    dist_ckpt_optim_fully_reshardable: bool = switch("--dist-ckpt-optim-fully-reshardable", MODEL, "save the distributed "
        "optimizer state in megatron-core's fully_reshardable format (gathered per data-parallel group while saving), "
        "which resumes on any tensor/pipeline/expert layout; the default dp_reshardable format saves without "
        "communication but resumes only with the same tensor/pipeline/expert sizes")
    from_scratch: bool = switch("--from-scratch", MODEL, "random weights (normal, std 0.02) for the paper's 'MoE from "
        "scratch' baseline; needs --model-config", negatable=False)
    model_config: Optional[str] = option("--model-config", MODEL, "Hugging Face model folder giving the dense "
        "architecture and tokenizer (--from-scratch)")
    moe_router_type: str = option("--moe-router-type", MODEL, f"router for --from-scratch (default {BASELINE_ROUTER}): "
        + routers_help(), BASELINE_ROUTER, choices=router_names())
    num_experts: int = option("--num-experts", MODEL, "experts per layer for --from-scratch (default 8)", 8, type=int)
    moe_router_topk: int = option("--moe-router-topk", MODEL, "experts per token for --from-scratch (default 2)", 2, type=int)
    num_routers: Optional[int] = option("--num-routers", MODEL, "Mixture-of-Routers router count for --from-scratch "
        "--moe-router-type mor (default: the number of experts)", type=int)
    init_method_std: float = option("--init-method-std", MODEL, "std of the random normal init for --from-scratch "
        "(default 0.02)", 0.02, type=float)

    # data
    data_path: Optional[List[str]] = option("--data-path", DATA, "indexed dataset prefix(es) (PREFIX.bin/.idx), or a "
        "weighted blend: '0.3 PREFIX_A 0.7 PREFIX_B'", nargs="+")
    split: str = option("--split", DATA, "train,validation,test proportions of the documents (default 969,30,1)", "969,30,1")
    data_cache_path: Optional[str] = option("--data-cache-path", DATA, "folder for the dataset index caches (default: "
        "beside the data)")
    seq_length: int = option("--seq-length", DATA, "tokens per sample (default 4096)", 4096, type=int)
    micro_batch_size: int = option("--micro-batch-size", DATA, "samples per forward pass per data-parallel rank "
        "(default 4)", 4, type=int)
    global_batch_size: int = option("--global-batch-size", DATA, "samples per optimizer step over all ranks; gradient "
        "accumulation = global / (micro x data-parallel size) (default 1024)", 1024, type=int)
    eod_mask_loss: bool = switch("--eod-mask-loss", DATA, "no loss on end-of-document tokens (Megatron-LM's flag; "
        "default off)", negatable=False)

    # parallelism, precision and speed
    tensor_model_parallel_size: int = option("--tensor-model-parallel-size", SPEED, "tensor parallel size (default 1); "
        "with MoE it needs --sequence-parallel", 1, type=int)
    pipeline_model_parallel_size: int = option("--pipeline-model-parallel-size", SPEED, "pipeline parallel size, 1F1B "
        "schedule (default 1); must divide the number of layers", 1, type=int)
    expert_model_parallel_size: int = option("--expert-model-parallel-size", SPEED, "expert parallel size (default 1); "
        "must divide the number of experts", 1, type=int)
    sequence_parallel: bool = switch("--sequence-parallel", SPEED, "split activations outside attention over the "
        "tensor-parallel group (ignored when the tensor-parallel size is 1, as Megatron-LM)")
    bf16: bool = switch("--bf16", SPEED, "bfloat16 weights and activations, float32 main weights in the optimizer and "
        "float32 gradient reduction (default off: float32; --no-bf16 overrides a config)")
    use_distributed_optimizer: bool = switch("--use-distributed-optimizer", SPEED, "shard the optimizer state and "
        "float32 main weights over the data-parallel ranks (ZeRO-1)")
    overlap_grad_reduce: bool = switch("--overlap-grad-reduce", SPEED, "reduce gradient buckets while the backward "
        "pass still runs")
    overlap_param_gather: bool = switch("--overlap-param-gather", SPEED, "all-gather updated parameters during the next "
        "forward pass (needs --use-distributed-optimizer and --overlap-grad-reduce)")
    transformer_impl: Optional[str] = option("--transformer-impl", SPEED, "layer implementation: transformer_engine "
        "(default where it imports and CUDA is present) or local (megatron-core's torch modules; the only choice on CPU)",
        choices=("local", "transformer_engine"))
    moe_grouped_gemm: bool = switch("--moe-grouped-gemm", SPEED, "run the local experts as one grouped GEMM (CUDA)")
    moe_token_dispatcher_type: str = option("--moe-token-dispatcher-type", SPEED, "how tokens reach their experts "
        "(default allgather; alltoall is faster with expert parallelism)", "allgather", choices=("allgather", "alltoall"))
    recompute_granularity: Optional[str] = option("--recompute-granularity", SPEED, "recompute activations in the "
        "backward pass: full transformer layers, or selective (core attention only)", choices=("full", "selective"))
    recompute_method: Optional[str] = option("--recompute-method", SPEED, "with full recompute: uniform = checkpoint "
        "groups of --recompute-num-layers layers, block = recompute the first --recompute-num-layers layers of each "
        "pipeline stage", choices=("uniform", "block"))
    recompute_num_layers: Optional[int] = option("--recompute-num-layers", SPEED, "layers per group (uniform) or per "
        "stage (block) for full recompute", type=int)

    # optimization
    train_iters: Optional[int] = option("--train-iters", OPTIMIZATION, "optimizer steps to train for (required)", type=int)
    lr: float = option("--lr", OPTIMIZATION, "peak learning rate (default 3e-4)", 3e-4, type=float)
    min_lr: float = option("--min-lr", OPTIMIZATION, "floor of the learning rate (default 0)", 0.0, type=float)
    lr_warmup_iters: Optional[int] = option("--lr-warmup-iters", OPTIMIZATION, "linear warmup steps from 0 to --lr "
        "(Megatron-LM starts at 0)", type=int)
    lr_warmup_fraction: Optional[float] = option("--lr-warmup-fraction", OPTIMIZATION, "warmup as a fraction of "
        "--train-iters (instead of --lr-warmup-iters)", type=float)
    lr_decay_style: str = option("--lr-decay-style", OPTIMIZATION, "after warmup: constant, cosine or linear to --min-lr "
        "at --train-iters, or step: constant, then x --lr-step-decay-factor at each --lr-step-decay-fractions (the "
        "paper's schedule; default)", "step", choices=("constant", "cosine", "linear", "step"))
    lr_step_decay_fractions: List[float] = option("--lr-step-decay-fractions", OPTIMIZATION, "fractions of --train-iters "
        "at which the step style multiplies the rate (default 0.8 0.9)", [0.8, 0.9], type=float, nargs="+")
    lr_step_decay_factor: float = option("--lr-step-decay-factor", OPTIMIZATION, "step style factor (default 0.316)",
        0.316, type=float)
    adam_beta1: float = option("--adam-beta1", OPTIMIZATION, "Adam beta1 (default 0.9)", 0.9, type=float)
    adam_beta2: float = option("--adam-beta2", OPTIMIZATION, "Adam beta2 (default 0.95)", 0.95, type=float)
    adam_eps: float = option("--adam-eps", OPTIMIZATION, "Adam epsilon (default 1e-8)", 1e-8, type=float)
    weight_decay: float = option("--weight-decay", OPTIMIZATION, "decoupled weight decay, not applied to biases and 1-D "
        "parameters (norms), as Megatron-LM (default 0.1)", 0.1, type=float)
    clip_grad: float = option("--clip-grad", OPTIMIZATION, "clip the global gradient norm to this; 0 = no clipping "
        "(default 1.0)", 1.0, type=float)
    moe_aux_loss_coeff: float = option("--moe-aux-loss-coeff", OPTIMIZATION, "load-balancing loss coefficient (default "
        "0.01; Megatron-LM's default is 0)", 0.01, type=float)
    moe_z_loss_coeff: Optional[float] = option("--moe-z-loss-coeff", OPTIMIZATION, "router z-loss coefficient (default: "
        "none)", type=float)
    locmoe_locality_coeff: float = option("--locmoe-locality-coeff", OPTIMIZATION, "locmoe router only: coefficient mu "
        "of LocMoE's locality loss, read with data parallelism as mu * KL(mean over the micro-batch's tokens of the "
        "softmax over all experts || uniform) (docs/method.md; default 0 = off)", 0.0, type=float)
    seed: int = option("--seed", OPTIMIZATION, "seed for initialisation and data order (default 1234)", 1234, type=int)

    # intervals and logging
    save_interval: Optional[int] = option("--save-interval", LOGGING, "save a checkpoint every N steps (and always at "
        "the end)", type=int)
    exit_interval: Optional[int] = option("--exit-interval", LOGGING, "save and exit when the step count is a multiple "
        "of N", type=int)
    log_interval: int = option("--log-interval", LOGGING, "print and record metrics every N steps (default 100)", 100, type=int)
    eval_interval: int = option("--eval-interval", LOGGING, "validation loss every N steps (default 1000)", 1000, type=int)
    eval_iters: int = option("--eval-iters", LOGGING, "global batches per validation (default 100); 0 = none", 100, type=int)
    tensorboard_dir: Optional[str] = option("--tensorboard-dir", LOGGING, "write TensorBoard scalars here (needs the "
        "tensorboard package)")
    wandb_project: Optional[str] = option("--wandb-project", LOGGING, "log to Weights & Biases (offline mode when "
        "WANDB_API_KEY is unset)")
    wandb_exp_name: Optional[str] = option("--wandb-exp-name", LOGGING, "W&B run name (default: the --save folder's name)")
    peak_flops: Optional[float] = option("--peak-flops", LOGGING, "peak FLOP/s per device for the MFU estimate "
        "(default: H100 bf16 989e12 on CUDA; no MFU on CPU unless given)", type=float)

    @property
    def warmup_iters(self) -> int:
        if self.lr_warmup_iters is not None:
            return self.lr_warmup_iters
        return int(round((self.lr_warmup_fraction or 0.0) * self.train_iters))

    def replace(self, **changes) -> "TrainingConfig":
        return dataclasses.replace(self, **changes)

    def check(self) -> None:
        """Settings that are wrong whatever the files and the device say (TrainError, naming the flag)."""
        if self.train_iters is None or self.train_iters < 1:
            raise TrainError("--train-iters is required and must be at least 1")
        if not self.data_path:
            raise TrainError("--data-path is required (indexed dataset prefix or weighted blend)")
        if self.from_scratch and self.pretrained_checkpoint:
            raise TrainError("--from-scratch and --pretrained-checkpoint exclude each other")
        if self.from_scratch and not self.model_config:
            raise TrainError("--from-scratch needs --model-config HF_DIR (architecture and tokenizer)")
        if not (self.from_scratch or self.pretrained_checkpoint or self.load):
            raise TrainError("give --pretrained-checkpoint DIR, --from-scratch --model-config HF_DIR, or --load DIR to resume")
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
                     "seq_length", "micro_batch_size", "global_batch_size", "log_interval", "eval_interval"):
            if getattr(self, name) < 1:
                raise TrainError(f"{flag_of(name)} must be at least 1")
        if self.tensor_model_parallel_size > 1 and not self.sequence_parallel:
            raise TrainError("MoE with tensor parallelism needs --sequence-parallel (megatron-core requires it)")
        if self.overlap_param_gather and not (self.use_distributed_optimizer and self.overlap_grad_reduce):
            raise TrainError("--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce")
        if self.recompute_granularity == "full" and not (self.recompute_method and self.recompute_num_layers):
            raise TrainError("--recompute-granularity full needs --recompute-method uniform|block and --recompute-num-layers N")
        if self.recompute_granularity != "full" and (self.recompute_method or self.recompute_num_layers):
            raise TrainError("--recompute-method and --recompute-num-layers apply only to --recompute-granularity full")
        if self.lr_warmup_iters is not None and self.lr_warmup_fraction is not None:
            raise TrainError("give --lr-warmup-iters or --lr-warmup-fraction, not both")
        if self.lr_warmup_fraction is not None and not 0 <= self.lr_warmup_fraction < 1:
            raise TrainError("--lr-warmup-fraction must be in [0, 1)")
        if not self.lr > 0:
            raise TrainError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise TrainError("--min-lr must be between 0 and --lr")
        if self.locmoe_locality_coeff < 0:
            raise TrainError("--locmoe-locality-coeff must be at least 0")
        if any(not 0 < f < 1 for f in self.lr_step_decay_fractions):
            raise TrainError("--lr-step-decay-fractions must lie strictly between 0 and 1")
        self._check_numbers()
        check_split(self.split)
        if self.save:
            parent = os.path.dirname(os.path.abspath(self.save))
            if os.path.exists(parent) and not os.path.isdir(parent):
                raise TrainError(f"--save {self.save}: its parent {parent} is a file")

    def _check_numbers(self) -> None:
        """The limits of the numbers check() does not cover with a rule of its own (name, least value, whether the
        least value itself is allowed); None is allowed where the field's default is None."""
        limits = (("eval_iters", 0, True), ("lr_warmup_iters", 0, True), ("save_interval", 1, True),
                  ("exit_interval", 1, True), ("recompute_num_layers", 1, True), ("clip_grad", 0, True),
                  ("weight_decay", 0, True), ("adam_beta1", 0, True), ("adam_beta2", 0, True), ("adam_eps", 0, False),
                  ("init_method_std", 0, False), ("lr_step_decay_factor", 0, False), ("moe_aux_loss_coeff", 0, True),
                  ("moe_z_loss_coeff", 0, True), ("peak_flops", 0, False))
        for name, least, inclusive in limits:
            value = getattr(self, name)
            if value is not None and (value < least if inclusive else value <= least):
                bound = f"at least {least}" if inclusive else f"above {least}"
                raise TrainError(f"{flag_of(name)} must be {bound}, got {value}")
        for name in ("adam_beta1", "adam_beta2"):
            if getattr(self, name) >= 1:
                raise TrainError(f"{flag_of(name)} must be below 1, got {getattr(self, name)}")

    def on_this_machine(self) -> "TrainingConfig":
        """The config with the layer implementation chosen (Transformer Engine where it imports and CUDA is present,
        else local); TrainError for a setting this machine cannot run. Imports torch when it must ask about CUDA."""
        from router_upcycling.mcore.parallel import transformer_engine_available, unsupported_here

        config = self if self.transformer_impl else self.replace(
            transformer_impl="transformer_engine" if transformer_engine_available() else "local")
        refusals = unsupported_here(dataclasses.asdict(config))
        if refusals:
            raise TrainError(refusals[0])
        return config

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "TrainingConfig":
        values = {field.name: getattr(args, field.name) for field in dataclasses.fields(cls)}
        data_path = values["data_path"]
        if data_path:  # a YAML string or one quoted argument holds the blend as one string
            values["data_path"] = [part for item in ([data_path] if isinstance(data_path, str) else data_path)
                                   for part in str(item).split()]
        if values["tensor_model_parallel_size"] == 1:
            values["sequence_parallel"] = False  # as Megatron-LM: nothing to split over
        return cls(**values)


def check_split(split: str) -> None:
    """--split as megatron-core reads it: up to three non-negative proportions, train,validation,test, with some
    share for training."""
    try:
        shares = [float(part) for part in str(split).split(",")]
    except ValueError:
        shares = []
    if not shares or len(shares) > 3 or any(share < 0 for share in shares) or shares[0] <= 0:
        raise TrainError(f"--split must be up to three comma-separated proportions train,validation,test with a "
                         f"positive training share, e.g. 969,30,1; got {split!r}")


def check_data_files(data_path: List[str]) -> None:
    """Every dataset prefix of --data-path (a list of prefixes, or a weighted blend '0.3 A 0.7 B', read as
    megatron-core's get_blend_from_list reads it) has its .bin and .idx files."""
    data_prefixes(data_path)


def data_prefixes(data_path: List[str]) -> List[str]:
    """The dataset prefixes of --data-path, each checked to have its .bin and .idx files (check_data_files)."""
    prefixes = data_path
    if len(data_path) > 1 and len(data_path) % 2 == 0:
        try:
            [float(weight) for weight in data_path[0::2]]
        except ValueError:
            raise TrainError("--data-path blend must alternate weights and prefixes: '0.3 PREFIX_A 0.7 PREFIX_B'") from None
        prefixes = data_path[1::2]
    prefixes = [prefix.strip() for prefix in prefixes]
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                raise TrainError(f"dataset file not found: {prefix + suffix} (--data-path takes prefixes of .bin/.idx pairs)")
    return prefixes


def flag_of(field: str) -> str:
    return TrainingConfig.__dataclass_fields__[field].metadata["flag"]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="python -m router_upcycling.train",
        description="Train an upcycled (or from-scratch) MoE with megatron-core. Run it directly, under torchrun "
        "or under srun. With --load/--save it resumes automatically: model, optimizer, scheduler, RNG and the data "
        "position come back from the newest complete checkpoint in --load. Flag names follow Megatron-LM.",
    )
    parser.add_argument("--config", help="YAML file whose keys are these flags (dashes or underscores); command-line flags win")
    groups = {}
    for field in dataclasses.fields(TrainingConfig):
        meta = field.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        group.add_argument(meta["flag"], dest=field.name, default=default, help=meta["help"], **meta["argparse"])
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
    actions = {action.dest: action for action in parser._actions}
    defaults = {}
    for key, value in values.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in actions or dest in ("help", "config"):
            raise TrainError(f"config {path}: unknown key {key!r} (keys are this command's flag names)")
        defaults[dest] = yaml_value(f"config {path}: {key}", value, actions[dest])
    return defaults


def yaml_value(where: str, value, action: argparse.Action):
    """A --config value as its flag's parser would hold it (argparse converts only text defaults); TrainError
    naming the key when YAML gave it the wrong type."""
    if value is None:
        if action.default is not None:
            raise TrainError(f"{where} needs a value (it has no 'none')")
        return None
    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            raise TrainError(f"{where} must be true or false, got {value!r}")
        return value
    if action.nargs == "+":
        return [_yaml_scalar(where, item, action) for item in (value if isinstance(value, list) else [value])]
    return _yaml_scalar(where, value, action)


def _yaml_scalar(where: str, value, action: argparse.Action):
    kind = action.type or str
    wanted = {int: "an integer", float: "a number", str: "text"}[kind]
    if isinstance(value, (bool, list, dict)) or (kind is int and isinstance(value, float)):
        raise TrainError(f"{where} must be {wanted}, got {value!r}")
    try:
        value = kind(value)  # YAML 1.1 reads 1e-4 (no dot) as text
    except ValueError:
        raise TrainError(f"{where} must be {wanted}, got {value!r}") from None
    if action.choices and value not in action.choices:
        raise TrainError(f"{where} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


def parse_args(argv: Optional[List[str]] = None, on_this_machine: bool = True) -> TrainingConfig:
    """The TrainingConfig of a command line (and its --config file), checked; with `on_this_machine`, also checked
    against this machine's devices (see TrainingConfig.on_this_machine)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**config_defaults(parser, args.config))
        args = parser.parse_args(argv)
    config = TrainingConfig.from_namespace(args)
    config.check()
    return config.on_this_machine() if on_this_machine else config
