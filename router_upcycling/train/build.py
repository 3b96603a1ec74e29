"""The model, its architecture's source, and megatron-core's DDP wrapper and optimizer around it.

One path for every device: megatron-core `DistributedDataParallel` (gradients reduced in float32),
`get_megatron_optimizer` (Adam with float32 main weights; sharded over data-parallel ranks with
--use-distributed-optimizer) and `finalize_model_grads`. What the CPU needs for them is in
router_upcycling.mcore.cpu.
"""
import argparse
import dataclasses
import json
import os
from typing import Optional

import torch

from router_upcycling.mcore.checkpoint import (
    RELEASE, TOKENIZER_DIR, CheckpointError, read_metadata, read_tracker, resolve_iteration_dir,
)
from router_upcycling.mcore.model import MoESettings, build_gpt_model, head_dim, transformer_config
from router_upcycling.mcore.parallel import current_device
from router_upcycling.mor import check_grap_split
from router_upcycling.train.arguments import TrainError


@dataclasses.dataclass
class ModelSource:
    """Where the architecture, the first weights and the tokenizer come from."""

    metadata: dict  # router_upcycling.json contents (docs/checkpoint-format.md)
    weights_dir: Optional[str]  # an iteration folder to load weights from; None = random init
    tokenizer_dir: str
    resume_dir: Optional[str]  # --load holds a training checkpoint: resume everything from it

    @property
    def hf_config(self) -> dict:
        return self.metadata["hf_config"]

    @property
    def moe(self) -> MoESettings:
        return MoESettings.from_dict(self.metadata["moe"])


def check_router_count(hf_config: dict, moe: MoESettings) -> None:
    """Random Mixture-of-Routers still needs R to split the query width and the keys to split over the experts."""
    query_width = hf_config["num_attention_heads"] * head_dim(hf_config)
    routers, experts = moe.num_routers, moe.num_experts
    if query_width % routers or max(routers, experts) % min(routers, experts):
        raise TrainError(f"--num-routers {moe.num_routers} must divide the query width {query_width} and be a "
                         f"divisor or multiple of --num-experts {moe.num_experts}")


def from_scratch_metadata(args: argparse.Namespace) -> dict:
    config_path = os.path.join(args.model_config, "config.json")
    if not os.path.isfile(config_path):
        raise TrainError(f"--model-config {args.model_config} has no config.json")
    with open(config_path) as f:
        hf_config = json.load(f)
    moe = MoESettings(num_experts=args.num_experts, topk=args.moe_router_topk, router=args.moe_router_type,
                      num_routers=args.num_routers)
    if moe.router == "mor":
        check_router_count(hf_config, moe)
    if moe.router == "locmoe":
        try:
            check_grap_split(hf_config["hidden_size"], moe.num_experts)
        except ValueError as err:
            raise TrainError(f"--num-experts {moe.num_experts}: {err}") from None
    return {"hf_config": hf_config, "moe": moe.to_dict(hf_config), "source_model": os.path.abspath(args.model_config),
            "calibration": None, "init": "from_scratch", "dtype": "bf16" if args.bf16 else "fp32",
            "training": {"iteration": 0, "consumed_tokens": 0}}


def resolve_model_source(args: argparse.Namespace) -> ModelSource:
    """Resume from --load when it holds a training checkpoint, else start from the pretrained checkpoint or from scratch."""
    if args.load and read_tracker(args.load) not in (None, RELEASE):
        resolve_iteration_dir(args.load)  # the tracker must name a complete checkpoint
        return ModelSource(read_metadata(args.load), None, os.path.join(args.load, TOKENIZER_DIR), args.load)
    pretrained = args.pretrained_checkpoint or (args.load if args.load and read_tracker(args.load) == RELEASE else None)
    if pretrained:
        metadata = read_metadata(pretrained)
        return ModelSource(metadata, resolve_iteration_dir(pretrained), os.path.join(pretrained, TOKENIZER_DIR), None)
    if args.from_scratch:
        return ModelSource(from_scratch_metadata(args), None, args.model_config, None)
    raise CheckpointError(f"--load {args.load} holds no checkpoint; add --pretrained-checkpoint or --from-scratch to start a run")


def check_layout_fits_model(args: argparse.Namespace, hf_config: dict, moe: MoESettings) -> None:
    """The parallel sizes must split the model evenly (megatron-core asserts; these are one-line errors)."""
    tp, pp, ep = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size
    layers = hf_config["num_hidden_layers"]
    if layers % pp:
        raise TrainError(f"--pipeline-model-parallel-size {pp} must divide the number of layers ({layers})")
    if moe.num_experts % ep:
        raise TrainError(f"--expert-model-parallel-size {ep} must divide the number of experts ({moe.num_experts})")
    kv_heads = hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"]
    sizes = {"attention heads": hf_config["num_attention_heads"], "key/value heads": kv_heads,
             "FFN width": hf_config["intermediate_size"], "vocabulary": hf_config["vocab_size"]}
    for what, size in sizes.items():
        if size % tp:
            raise TrainError(f"--tensor-model-parallel-size {tp} must divide the number of {what} ({size})")


def recompute_settings(args: argparse.Namespace) -> dict:
    """TransformerConfig fields of the recompute flags (Megatron-LM's meaning)."""
    if not args.recompute_granularity:
        return {}
    return {"recompute_granularity": args.recompute_granularity, "recompute_method": args.recompute_method,
            "recompute_num_layers": args.recompute_num_layers}


def check_router_flags(args: argparse.Namespace, moe: MoESettings) -> None:
    """Router-specific training flags must match the model's router."""
    if args.locmoe_locality_coeff and moe.router != "locmoe":
        raise TrainError(f"--locmoe-locality-coeff applies to the locmoe router only; this model's router is {moe.router}")


def build_model(args: argparse.Namespace, source: ModelSource) -> torch.nn.Module:
    """This pipeline stage's GPTModel on the run's device; random init (std --init-method-std) unless weights are loaded afterwards."""
    from megatron.core import parallel_state
    from megatron.core.utils import init_method_normal

    check_layout_fits_model(args, source.hf_config, source.moe)
    config = transformer_config(
        source.hf_config, source.moe,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_z_loss_coeff=args.moe_z_loss_coeff,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_grouped_gemm=args.moe_grouped_gemm,
        init_method_std=args.init_method_std,
        # the paper's from-scratch baseline: every weight normal(0, std), without Megatron's depth-scaled output init
        output_layer_init_method=init_method_normal(args.init_method_std),
        **recompute_settings(args),
    )
    model = build_gpt_model(
        source.hf_config, source.moe, config,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        use_transformer_engine=args.transformer_impl == "transformer_engine",
        locality_coeff=args.locmoe_locality_coeff,
    )
    return model.to(current_device())


def keep_experts_apart(model: torch.nn.Module) -> None:
    """Expert weights get their own gradient buffers and optimizer at every expert-parallel size.

    megatron-core marks expert weights `allreduce=False` (reduced over the expert-data-parallel group,
    stepped by a second optimizer) only when expert parallelism is on; with one expert-parallel rank they
    join the dense weights. The optimizer's checkpoint then changes shape between EP = 1 and EP > 1, and
    megatron-core cannot reshard it. With one expert-parallel rank the expert-data-parallel group is the
    data-parallel group, so marking them always changes no number and keeps one optimizer layout.
    """
    for layer in model.decoder.layers:
        for param in layer.mlp.experts.parameters():
            param.allreduce = False


def wrap_for_training(model: torch.nn.Module, args: argparse.Namespace):
    """(DDP-wrapped model, megatron optimizer), with the schedule hooks Megatron-LM sets on the model config."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        # Megatron-LM's default: 40M-element buckets when overlapping, one bucket otherwise
        bucket_size=40_000_000 if args.overlap_grad_reduce else None,
    )
    keep_experts_apart(model)
    ddp_model = DistributedDataParallel(model.config, ddp_config, model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
            clip_grad=args.clip_grad, bf16=args.bf16, params_dtype=model.config.params_dtype,
            use_distributed_optimizer=args.use_distributed_optimizer,
            overlap_param_gather=args.overlap_param_gather,
        ),
        [ddp_model],
    )
    config = model.config
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    if args.overlap_grad_reduce:
        config.no_sync_func = ddp_model.no_sync
        config.grad_sync_func = ddp_model.start_grad_sync  # Megatron-LM's --align-grad-reduce (its default)
    return ddp_model, optimizer
