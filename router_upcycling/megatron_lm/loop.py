"""What `pretrain()` is given: Megatron-LM's GPT datasets, the forward step with its loss, and our routing health.

The datasets and the loss are Megatron-LM's (`pretrain_gpt.py`, core_r0.19.0) for plain GPT pretraining on indexed
data (no SFT, FIM, packed sequences or multi-token prediction). The routing health is our trainer's
(`train/metrics.RoutingCounter`): every `--log-interval` iterations, per MoE layer, to Megatron-LM's TensorBoard and
W&B writers as `routing_health/layer{l}/{max_share,dead_experts,...}` and one line on stdout.
"""
from functools import partial
from typing import Optional

import torch

_counter = None
_reported_at = 0


def keep_experts_apart(model_chunks):
    """A pre-wrap hook: expert weights get their own optimizer at every expert-parallel size, as in our trainer
    (train/build.py), so the two trainers' checkpoints have one optimizer layout and reshard between EP sizes."""
    from megatron.core.utils import unwrap_model

    from router_upcycling.train.build import keep_experts_apart as mark

    for chunk in unwrap_model(model_chunks):
        mark(chunk)
    return model_chunks


def count_routing(model_chunks):
    """A post-wrap hook: count the routing of this rank's MoE layers (every model chunk's)."""
    global _counter
    from megatron.core.utils import unwrap_model

    from router_upcycling.mcore.parallel import current_device
    from router_upcycling.train.metrics import RoutingCounter

    _counter = [RoutingCounter(chunk, current_device()) for chunk in unwrap_model(model_chunks)]
    return model_chunks


def report_routing(iteration: int) -> None:
    """Every rank calls this at the same iterations (it all-reduces); rank 0 prints, the writers' ranks log."""
    from megatron.training import print_rank_0
    from megatron.training.global_vars import get_tensorboard_writer, get_wandb_writer

    from router_upcycling.train.metrics import health_summary

    layers = []
    for counter in _counter:
        layers += [layer for layer in counter.report()["routing_health"] if layer["max_share"] > 0]
    if not layers:
        return
    scalars = {f"routing_health/layer{layer}/{name}": value
               for layer, health in enumerate(layers) for name, value in health.items()}
    tensorboard, wandb = get_tensorboard_writer(), get_wandb_writer()
    if tensorboard is not None:
        for name, value in scalars.items():
            tensorboard.add_scalar(name, value, iteration)
    if wandb is not None:
        wandb.log(scalars, iteration)
    dead = sum(layer["dead_experts"] for layer in layers)
    print_rank_0(f" routing health at iteration {iteration}: max share {health_summary(layers):.3f}, "
                 f"dead experts {dead:g} (over {len(layers)} layers)")


def maybe_report_routing() -> None:
    global _reported_at
    from megatron.training import get_args

    args = get_args()
    iteration = getattr(args, "curr_iteration", 0)
    if _counter and iteration > _reported_at and iteration % args.log_interval == 0:
        _reported_at = iteration
        report_routing(iteration)


def get_batch(data_iterator, vp_stage: Optional[int] = None):
    """(tokens, labels, loss_mask, attention_mask, position_ids) on this rank, broadcast over tensor parallelism."""
    from megatron.core import mpu
    from megatron.core.utils import get_batch_on_this_cp_rank, get_batch_on_this_tp_rank
    from megatron.training import get_args
    from megatron.training.utils import is_first_or_last_pipeline_stage

    from router_upcycling.mcore.parallel import current_device

    args = get_args()
    if not is_first_or_last_pipeline_stage(vp_stage):
        return None, None, None, None, None
    batch = {}
    if mpu.get_tensor_model_parallel_rank() == 0:
        batch = {key: (value.to(current_device(), non_blocking=True) if torch.is_tensor(value) else value)
                 for key, value in next(data_iterator).items()}
    batch = get_batch_on_this_tp_rank(
        batch, has_cu_seqlens=False, is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(), broadcast_group=mpu.get_tensor_model_parallel_group(),
        cp_size=args.context_parallel_size, tp_rank=mpu.get_tensor_model_parallel_rank(),
        micro_batch_size=args.micro_batch_size, seq_length=args.seq_length, mtp_on_this_rank=False,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(), is_pipeline_last_stage=mpu.is_pipeline_last_stage(),
    )
    batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=mpu.get_context_parallel_group())
    return (batch["tokens"], batch["labels"], batch["loss_mask"], batch.get("attention_mask"), batch["position_ids"])


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron-LM's: the summed token loss, the token count, and the report it averages over data parallelism."""
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    from megatron.core.utils import get_attr_wrapped_model
    from megatron.training import get_timers

    maybe_report_routing()
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator,
                                                                         get_attr_wrapped_model(model, "vp_stage"))
    timers("batch-generator").stop()
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
    return output_tensor, partial(loss_func, loss_mask)


def dataset_config(args):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=args.split, num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path, mmap_bin_files=args.mmap_bin_files, tokenizer=build_tokenizer(args),
        reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss, create_attention_mask=args.create_attention_mask_in_dataloader,
        context_parallel_size=args.context_parallel_size, data_parallel_size=args.data_parallel_size,
        sequence_parallel_size=args.tensor_model_parallel_size * args.sequence_parallel,
    )


def datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Megatron-LM's GPT datasets (or its mock data with --mock-data), built on the ranks that read data."""
    from megatron.core import mpu
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.training import get_args, print_rank_0
    from megatron.training.utils import is_first_or_last_pipeline_stage

    args = get_args()
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0("> building train, validation, and test datasets for GPT ...")

    def built_on_this_rank():
        return mpu.get_tensor_model_parallel_rank() == 0 and is_first_or_last_pipeline_stage(vp_stage)

    return BlendedMegatronDatasetBuilder(dataset_type, train_val_test_num_samples, built_on_this_rank,
                                         dataset_config(args)).build()


datasets_provider.is_distributed = True  # Megatron-LM builds the datasets on every rank that calls this
