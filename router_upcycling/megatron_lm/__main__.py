"""Router Upcycling on Megatron-LM's own training loop (`megatron.training.pretrain`).

    torchrun --nproc-per-node 8 -m router_upcycling.megatron_lm \\
        --pretrained-checkpoint UPCYCLED --load RUN --save RUN --data-path PREFIX --seq-length 4096 \\
        --micro-batch-size 1 --global-batch-size 512 --train-iters 10000 --lr 2e-5 --bf16 ...

Every Megatron-LM flag works as in `pretrain_gpt.py`. The launcher adds what the checkpoint decides:
- the architecture flags (`tools/convert_checkpoint.py megatron-args`), unless given, and our layer spec; a given
  flag that disagrees with the checkpoint is refused in one line naming it (nothing is loaded);
- the tokenizer saved with the checkpoint (HuggingFaceTokenizer), unless --tokenizer-type / --tokenizer-model given;
- strict checkpoint loading (--dist-ckpt-strictness raise_all): a missing or unexpected weight stops the run;
- `router_upcycling.json` and `tokenizer/` in --save, so `export`, `verify` and our trainer read its checkpoints;
- the routing health of every MoE layer in Megatron-LM's TensorBoard / W&B logs (`routing_health/layer{l}/...`).
Our options beyond Megatron-LM's: --locmoe-locality-coeff (LocMoE runs).
On a machine without CUDA, the CPU compatibility of router_upcycling.mcore.cpu is applied (gloo, local layers).
"""
import os
import shutil
import sys
from typing import List, Optional

from router_upcycling.checkpoint_folder import METADATA_FILE, read_metadata, write_metadata
from router_upcycling.errors import UserError
from router_upcycling.megatron_lm.flags import megatron_flags, mismatched_flags, refusal

NEEDS = ("python -m router_upcycling.megatron_lm needs Megatron-LM's training layer (megatron.training), which "
         "megatron-core ships from 0.17 on (Python >= 3.12): pip install 'megatron-core>=0.19' (make setup-latest); "
         "with megatron-core {version} use python -m router_upcycling.train")
CPU_FLAGS = ["--transformer-impl", "local", "--distributed-backend", "gloo", "--use-cpu-initialization",
             "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion",
             "--no-gradient-accumulation-fusion", "--no-persist-layer-norm"]


def given_options(argv: List[str]) -> set:
    return {part.split("=", 1)[0] for part in argv if part.startswith("--")}


def option_value(argv: List[str], option: str) -> Optional[str]:
    value = None
    for i, part in enumerate(argv):
        if part == option and i + 1 < len(argv):
            value = argv[i + 1]
        elif part.startswith(option + "="):
            value = part.split("=", 1)[1]
    return value


def source_checkpoint(argv: List[str]) -> str:
    """The checkpoint whose metadata decides the architecture: --load when it holds ours, else --pretrained-checkpoint."""
    for option in ("--load", "--pretrained-checkpoint"):
        folder = option_value(argv, option)
        if folder and os.path.isfile(os.path.join(folder, METADATA_FILE)):
            return folder
    raise UserError(f"give --pretrained-checkpoint (an upcycled checkpoint) or --load (a run of ours) holding {METADATA_FILE}")


def not_given(flags: List[str], given: set) -> List[str]:
    """The flags (each with its values) whose option is not among `given`."""
    kept, i = [], 0
    while i < len(flags):
        j = i + 1
        while j < len(flags) and not flags[j].startswith("--"):
            j += 1
        if flags[i] not in given:
            kept += flags[i:j]
        i = j
    return kept


def strictness(argv: List[str]) -> str:
    """raise_all: a weight the checkpoint lacks, or one it has that the model does not take, stops the load. Except
    for a --load checkpoint holding Megatron-LM's rerun-state-machine state: Megatron-LM (core_r0.19.0) saves it
    while no rerun is pending and then does not ask for it back, which raise_all refuses; such a checkpoint is loaded
    with log_all (mismatches logged; the architecture flags were checked against the checkpoint before)."""
    from router_upcycling.checkpoint_folder import CheckpointError, DamagedTracker, iteration_dir_name, read_tracker
    from router_upcycling.mcore.checkpoint import common_state, iteration_problem

    load = option_value(argv, "--load")
    try:
        tracked = read_tracker(load) if load else None
    except DamagedTracker as err:
        raise CheckpointError(f"{err}; Megatron-LM's loader resumes from what it names: write the number of an "
                              "intact iteration into it (our trainer, python -m router_upcycling.train, falls back "
                              "by itself)") from None
    if tracked is not None:
        newest = os.path.join(load, iteration_dir_name(tracked))
        if iteration_problem(newest) is None and "rerun_state_machine" in common_state(newest):
            print(f"note: {newest} holds Megatron-LM's rerun-state-machine state, which Megatron-LM does not load back: "
                  "loading it with --dist-ckpt-strictness log_all", file=sys.stderr)
            return "log_all"
    return "raise_all"


def launcher_argv(argv: List[str], arch, moe, checkpoint: str, on_cpu: bool) -> List[str]:
    """Our flags the user did not give (the checkpoint's architecture, then defaults), then the user's."""
    defaults = ["--ckpt-format", "torch_dist"]
    if "--dist-ckpt-strictness" not in given_options(argv):
        defaults += ["--dist-ckpt-strictness", strictness(argv)]
    tokenizer = os.path.join(checkpoint, "tokenizer")
    if os.path.isdir(tokenizer) and "--tokenizer-type" not in given_options(argv):
        defaults += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer]
    if on_cpu:
        defaults += CPU_FLAGS
    return not_given(megatron_flags(arch, moe) + defaults, given_options(argv)) + argv


def add_router_args(parser):
    group = parser.add_argument_group("router_upcycling", "Router Upcycling (router and architecture come from the checkpoint)")
    group.add_argument("--locmoe-locality-coeff", type=float, default=0.0,
                       help="locmoe router only: coefficient of LocMoE's locality loss")
    return parser


def carry_metadata(source: str, save: Optional[str]) -> None:
    """Give --save our metadata and the tokenizer (rank 0, before training), so our tools read its checkpoints."""
    if not save or int(os.environ.get("RANK", "0")) != 0 or os.path.isfile(os.path.join(save, METADATA_FILE)):
        return
    os.makedirs(save, exist_ok=True)
    metadata = {key: value for key, value in read_metadata(source).items() if key not in ("format_version", "training")}
    metadata["trainer"] = "megatron_lm"
    write_metadata(save, metadata)
    if os.path.isdir(os.path.join(source, "tokenizer")) and not os.path.isdir(os.path.join(save, "tokenizer")):
        shutil.copytree(os.path.join(source, "tokenizer"), os.path.join(save, "tokenizer"))


def use_shipped_dataset_helpers() -> None:
    """megatron-core's wheel ships the compiled dataset helpers and no Makefile, yet Megatron-LM's initialisation
    runs `make` on them (`initialize._compile_dependencies`), which fails there: skip the build when they import."""
    import importlib.util

    if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is None:
        return
    from megatron.core.datasets import utils

    utils.compile_helpers = lambda: None


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("megatron.training") is None:  # found without importing megatron-core
        print(f"error: {NEEDS.format(version=importlib.metadata.version('megatron-core'))}", file=sys.stderr)
        return 2
    import torch

    from router_upcycling.checkpoint_folder import read_checkpoint_settings

    try:
        checkpoint = source_checkpoint(argv)
        _, arch, moe = read_checkpoint_settings(checkpoint)
        full_argv = launcher_argv(argv, arch, moe, checkpoint, on_cpu=not torch.cuda.is_available())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        from router_upcycling.mcore import cpu

        cpu.enable_training_layer()
    use_shipped_dataset_helpers()
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    from router_upcycling.megatron_lm import loop
    from router_upcycling.megatron_lm.spec import CHECKPOINT_ENV, layer_spec

    sys.argv = [sys.argv[0], *full_argv]
    args = parse_and_validate_args(extra_args_provider=add_router_args)
    problems = mismatched_flags(args, arch, moe)
    if problems:
        print(f"error: {refusal(problems, checkpoint)}", file=sys.stderr)
        return 2
    os.environ[CHECKPOINT_ENV] = checkpoint
    carry_metadata(checkpoint, args.save)
    model_config = gpt_config_from_args(args)
    model_config.transformer_layer_spec = layer_spec
    model_config.pre_wrap_hooks = [*getattr(model_config, "pre_wrap_hooks", []), loop.keep_experts_apart]
    model_config.post_wrap_hooks = [*getattr(model_config, "post_wrap_hooks", []), loop.count_routing]
    pretrain(pretrain_cfg_container_from_args(args, model_config), loop.datasets_provider,
             ModelType.encoder_or_decoder, loop.forward_step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
