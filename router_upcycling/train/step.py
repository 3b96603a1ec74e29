"""One training step and one validation pass, through megatron-core's forward/backward schedule.

`get_forward_backward_func()` picks the schedule from the pipeline size (no pipelining, or 1F1B);
it scales the loss by 1/micro-batches, runs backward through DDP's gradient buffers, and calls the
config's finalize_model_grads (data-parallel reduction, tensor-parallel norm and router gradients,
tied embeddings across pipeline stages).

Shapes: b micro batch, s sequence length.
"""
import functools
from typing import Callable, Dict, Iterator, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from router_upcycling.mcore.model import causal_attention_mask


def masked_token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Megatron's 3-tuple loss contract: (sum of token losses, token count, values to report)."""
    loss_sum = (per_token_loss.float() * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.detach().float()])}


def make_forward_step(seq_length: int, device: torch.device) -> Callable:
    """forward_step_func(data_iterator, model) as megatron's schedules call it (on every pipeline stage)."""
    attention_mask = causal_attention_mask(seq_length, device=device)

    def forward_step_func(data_iterator: Iterator[Dict[str, torch.Tensor]], model):
        batch = next(data_iterator)
        per_token_loss = model(batch["tokens"], batch["position_ids"], attention_mask, labels=batch["labels"])  # [b, s]
        return per_token_loss, functools.partial(masked_token_loss, batch["loss_mask"])

    return forward_step_func


def forward_backward(model, data_iterator, forward_step_func, num_microbatches: int, config, forward_only: bool) -> List[Dict]:
    return get_forward_backward_func()(
        forward_step_func=forward_step_func, data_iterator=data_iterator, model=[model],
        num_microbatches=num_microbatches, seq_length=config.seq_length, micro_batch_size=config.micro_batch_size,
        forward_only=forward_only,
    )


def mean_reported_loss(store: List[Dict], device: torch.device) -> float:
    """Token-weighted mean of the micro-batch losses over this step's micro-batches and data-parallel ranks."""
    totals = torch.zeros(2, device=device)
    if parallel_state.is_pipeline_last_stage():
        for reported in store:
            totals += reported["lm loss"].to(device)
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    # the last pipeline stage holds the loss: share it with the whole pipeline
    dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    return (totals[0] / totals[1].clamp(min=1)).item()


def train_step(model, optimizer, data_iterator, forward_step_func, num_microbatches: int, config, device) -> Dict:
    """One optimizer step of megatron-core's DDP model; returns the step's loss and gradient norm."""
    model.train()
    model.zero_grad_buffer()
    optimizer.zero_grad()
    store = forward_backward(model, data_iterator, forward_step_func, num_microbatches, config, forward_only=False)
    update_successful, grad_norm, _ = optimizer.step()
    if not update_successful:
        raise RuntimeError("the optimizer skipped a step (non-finite gradients)")
    return {"lm_loss": mean_reported_loss(store, device), "grad_norm": float(grad_norm)}


@torch.no_grad()
def evaluate(model, batches: Iterator, forward_step_func, num_microbatches: int, config, device) -> float:
    """Mean token loss over --eval-iters global batches (the same validation samples every time)."""
    model.eval()
    store = []
    for _ in range(config.eval_iters):
        store += forward_backward(model, batches, forward_step_func, num_microbatches, config, forward_only=True)
    model.train()
    return mean_reported_loss(store, device)
