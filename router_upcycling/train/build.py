"""The model of a run (its source: router_upcycling.train.source), and megatron-core's DDP wrapper and optimizer around it.

One path for every device: megatron-core `DistributedDataParallel` (gradients reduced in float32),
`get_megatron_optimizer` (Adam with float32 main weights; sharded over data-parallel ranks with
--use-distributed-optimizer) and `finalize_model_grads`. What the CPU needs for them is in
router_upcycling.mcore.cpu.
"""
import torch

from router_upcycling.mcore.model import build_gpt_model, transformer_config
from router_upcycling.mcore.parallel import current_device
from router_upcycling.train.config import TrainingConfig
from router_upcycling.train.source import ModelSource, training_router_options


def recompute_settings(config: TrainingConfig) -> dict:
    """TransformerConfig fields of the recompute flags (Megatron-LM's meaning)."""
    if not config.recompute_granularity:
        return {}
    return {"recompute_granularity": config.recompute_granularity, "recompute_method": config.recompute_method,
            "recompute_num_layers": config.recompute_num_layers}


def build_model(config: TrainingConfig, source: ModelSource) -> torch.nn.Module:
    """This pipeline stage's GPTModel on the run's device; random init (std --init-method-std) unless weights are loaded afterwards."""
    from megatron.core import parallel_state
    from megatron.core.utils import init_method_normal

    model_config = transformer_config(
        source.arch, source.moe,
        params_dtype=torch.bfloat16 if config.bf16 else torch.float32,
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
        expert_model_parallel_size=config.expert_model_parallel_size,
        sequence_parallel=config.sequence_parallel,
        moe_aux_loss_coeff=config.moe_aux_loss_coeff,
        moe_z_loss_coeff=config.moe_z_loss_coeff,
        moe_token_dispatcher_type=config.moe_token_dispatcher_type,
        moe_grouped_gemm=config.moe_grouped_gemm,
        init_method_std=config.init_method_std,
        # the paper's from-scratch baseline: every weight normal(0, std), without Megatron's depth-scaled output init
        output_layer_init_method=init_method_normal(config.init_method_std),
        **recompute_settings(config),
    )
    model = build_gpt_model(
        source.arch, source.moe, model_config,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        use_transformer_engine=config.transformer_impl == "transformer_engine",
        **{name: value for name, value in training_router_options(config).items() if value},
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


def wrap_for_training(model: torch.nn.Module, config: TrainingConfig):
    """(DDP-wrapped model, megatron optimizer), with the schedule hooks Megatron-LM sets on the model config."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=config.use_distributed_optimizer,
        overlap_grad_reduce=config.overlap_grad_reduce,
        overlap_param_gather=config.overlap_param_gather,
        # Megatron-LM's default: 40M-element buckets when overlapping, one bucket otherwise
        bucket_size=40_000_000 if config.overlap_grad_reduce else None,
    )
    keep_experts_apart(model)
    ddp_model = DistributedDataParallel(model.config, ddp_config, model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=config.lr, min_lr=config.min_lr, weight_decay=config.weight_decay,
            adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2, adam_eps=config.adam_eps,
            clip_grad=config.clip_grad, bf16=config.bf16, params_dtype=model.config.params_dtype,
            use_distributed_optimizer=config.use_distributed_optimizer,
            overlap_param_gather=config.overlap_param_gather,
        ),
        [ddp_model],
    )
    model_config = model.config
    model_config.grad_scale_func = optimizer.scale_loss
    model_config.finalize_model_grads_func = finalize_model_grads
    if config.overlap_grad_reduce:
        model_config.no_sync_func = ddp_model.no_sync
        model_config.grad_sync_func = ddp_model.start_grad_sync  # Megatron-LM's --align-grad-reduce (its default)
    return ddp_model, optimizer
