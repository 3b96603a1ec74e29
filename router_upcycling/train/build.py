"""The model, its architecture's source and the optimizer, for GPU (megatron-core DDP + distributed
optimizer) and CPU (gloo, data parallel: torch AdamW over gradients averaged by an explicit all-reduce).

Why the CPU path differs: megatron-core's DDP keeps gradients in `main_grad` buffers and its
optimizer wrapper builds CUDA tensors, so on CPU the model stays unwrapped, autograd fills
`.grad`, and DataParallelAdamW averages it over the data-parallel group before stepping.
"""
import argparse
import dataclasses
import json
import os
from typing import Optional

import torch
import torch.distributed as dist

from router_upcycling.mcore.checkpoint import (
    RELEASE, TOKENIZER_DIR, CheckpointError, read_metadata, read_tracker, resolve_iteration_dir,
)
from router_upcycling.mcore.model import MoESettings, build_gpt_model, head_dim, transformer_config, transformer_engine_available
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


def build_model(args: argparse.Namespace, source: ModelSource) -> torch.nn.Module:
    """GPTModel on the run's device; random init (std --init-method-std) unless weights are loaded afterwards."""
    from megatron.core import parallel_state
    from megatron.core.utils import init_method_normal

    config = transformer_config(
        source.hf_config, source.moe,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_z_loss_coeff=args.moe_z_loss_coeff,
        init_method_std=args.init_method_std,
        # the paper's from-scratch baseline: every weight normal(0, std), without Megatron's depth-scaled output init
        output_layer_init_method=init_method_normal(args.init_method_std),
    )
    model = build_gpt_model(
        source.hf_config, source.moe, config,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        use_transformer_engine=args.device == "cuda" and transformer_engine_available(),
    )
    return model.to(torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else "cpu")


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Megatron-LM's convention: biases and 1-D parameters (norm scales) are not decayed."""
    return name.endswith(".bias") or param.ndim == 1


class DataParallelAdamW:
    """CPU optimizer step: average gradients over the data-parallel group, clip the global norm, AdamW.

    With data parallelism only every rank holds the whole model, so the averaged gradient and the
    norm are the same on every rank and the replicas stay identical. Its state is a plain torch
    optimizer state dict, saved per rank by train.checkpointing.
    """

    is_sharded = False

    def __init__(self, model: torch.nn.Module, args: argparse.Namespace) -> None:
        from megatron.core import parallel_state

        self.params = [p for p in model.parameters() if p.requires_grad]
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if not no_weight_decay(n, p)], "wd_mult": 1.0},
            {"params": [p for n, p in named if no_weight_decay(n, p)], "wd_mult": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                                           eps=args.adam_eps, weight_decay=args.weight_decay)
        self.clip_grad = args.clip_grad
        self.group = parallel_state.get_data_parallel_group()

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=False)

    def step(self) -> float:
        """Average, clip and apply the gradients; returns the global gradient norm before clipping."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.group)
        flat /= dist.get_world_size(self.group)
        for param, grad in zip(self.params, torch._utils._unflatten_dense_tensors(flat, grads)):
            param.grad = grad
        max_norm = self.clip_grad if self.clip_grad > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm).item()
        self.optimizer.step()
        return grad_norm

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


class MegatronOptimizerStep:
    """GPU optimizer step: megatron-core's (distributed) optimizer over a DDP-wrapped model; same interface as above."""

    is_sharded = True

    def __init__(self, ddp_model, args: argparse.Namespace) -> None:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        config = OptimizerConfig(
            optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
            clip_grad=args.clip_grad, bf16=args.bf16, params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
            use_distributed_optimizer=True,
        )
        self.ddp_model = ddp_model
        self.optimizer = get_megatron_optimizer(config, [ddp_model])

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.ddp_model.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self) -> float:
        update_successful, grad_norm, _ = self.optimizer.step()
        if not update_successful:
            raise RuntimeError("the optimizer skipped a step (non-finite gradients)")
        return float(grad_norm)

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False) -> dict:
        return self.optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading)

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def wrap_for_training(model: torch.nn.Module, args: argparse.Namespace):
    """(model the schedules run, optimizer). GPU: megatron DDP whose gradient reduction megatron's
    finalize_model_grads performs after the last micro-batch; CPU: the bare model."""
    if args.device == "cpu":
        return model, DataParallelAdamW(model, args)
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True,
                                               overlap_grad_reduce=False)
    ddp_model = DistributedDataParallel(model.config, ddp_config, model)
    optimizer = MegatronOptimizerStep(ddp_model, args)
    model.config.grad_scale_func = optimizer.optimizer.scale_loss
    model.config.finalize_model_grads_func = finalize_model_grads
    return ddp_model, optimizer
