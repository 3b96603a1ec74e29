"""Calibration: the average attention key of every layer of a frozen dense model (method.md part 2).

Documents are tokenized without special tokens, an EOS token is appended to each, they are
concatenated and cut into consecutive chunks of `seq_length` tokens (the last partial chunk kept),
up to `max_tokens` tokens (router_upcycling.text.token_chunks). The average key of layer l is the mean over every calibration token t of
k_proj(x_t) (with bias), x_t being the k_proj input (after input_layernorm), before RoPE. With QK-norm (Qwen3) the key
can be taken before the per-head norm (k_proj is affine: k_proj of the mean input) or after it (`after_norm`:
the mean of k_norm's output, which is not the norm of the mean: every token has its own scale).
`projection="q"` averages the queries instead (q_proj with its bias, or q_norm's output): one per query head,
which grouped-query attention does not share between heads (docs/method.md part 2, router init `query`).

Shape legend
    L  layers        H_kv  key/value heads      d_h  head dim
    B  batch         S     chunk length         d    hidden size
"""
import logging
from typing import Iterable, List, NamedTuple, Optional, Sequence, Union

import torch
from tqdm import tqdm

from router_upcycling.text import TextDataError, equal_length_batches, token_chunks

logger = logging.getLogger(__name__)

CUDA_TOKENS_PER_BATCH = 65536


def default_batch_size(seq_length: int, device: torch.device) -> int:
    """1 chunk per batch on CPU (larger batches do not run faster there); about 64k tokens per batch on CUDA."""
    return max(1, CUDA_TOKENS_PER_BATCH // seq_length) if device.type == "cuda" else 1


def _default_device(model: torch.nn.Module) -> torch.device:
    model_device = next(model.parameters()).device
    if model_device.type != "cpu":
        return model_device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The Qwen2Model inside a Qwen2ForCausalLM (running it skips the LM head), or the model itself."""
    return getattr(model, "model", model)


class _NormOutputSums:
    """Forward hooks on every layer's self_attn.{q,k}_norm that sum its output over tokens, in float64: [L, heads, d_h]."""

    def __init__(self, layers: Sequence[torch.nn.Module], norm: str, num_heads: int, head_dim: int, device: torch.device):
        self.sums = torch.zeros(len(layers), num_heads, head_dim, dtype=torch.float64, device=device)
        self.handles = [getattr(layer.self_attn, norm).register_forward_hook(self._hook(index))
                        for index, layer in enumerate(layers)]

    def _hook(self, index: int):
        def add_output(module, inputs, output):
            self.sums[index] += output.reshape(-1, *self.sums.shape[1:]).double().sum(dim=0)  # [..., H_kv, d_h]

        return add_output

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _KeyInputSums:
    """Forward pre-hooks on every layer's self_attn.k_proj that sum its input x over tokens, in float64."""

    def __init__(self, layers: Sequence[torch.nn.Module], device: torch.device):
        hidden_size = layers[0].self_attn.k_proj.in_features
        self.sums = torch.zeros(len(layers), hidden_size, dtype=torch.float64, device=device)  # [L, d]
        self.handles = [
            layer.self_attn.k_proj.register_forward_pre_hook(self._hook(index)) for index, layer in enumerate(layers)
        ]

    def _hook(self, index: int):
        def add_input(module, inputs):
            self.sums[index] += inputs[0].reshape(-1, inputs[0].shape[-1]).double().sum(dim=0)

        return add_input

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def _projections_of_mean_input(layers: Sequence[torch.nn.Module], mean_inputs: torch.Tensor, projection: str) -> torch.Tensor:
    """{q,k}_proj is affine, so mean_t proj(x_t) = proj(mean_t x_t): [L, d] -> [L, heads * d_h], float64."""
    outputs = []
    for layer, mean_input in zip(layers, mean_inputs):
        linear = getattr(layer.self_attn, f"{projection}_proj")
        bias = linear.bias.double() if linear.bias is not None else 0.0
        outputs.append(linear.weight.double() @ mean_input.to(linear.weight.device) + bias)
    return torch.stack(outputs)


class AverageKeys(NamedTuple):
    keys: torch.Tensor  # [L, H_kv, d_h] float32, on CPU ([L, H, d_h]: average queries, projection "q")
    tokens: int  # calibration tokens actually used: max_tokens, or fewer when the documents ran out


def average_attention_keys(
    model: torch.nn.Module,
    tokenizer,
    documents: Iterable[str],
    max_tokens: int,
    seq_length: int,
    batch_size: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
    after_norm: bool = False,
    projection: str = "k",
) -> AverageKeys:
    """Average pre-RoPE key of every layer and key/value head over the calibration tokens (or, with projection "q",
    the average query of every query head).

    Args:
        model: a dense Hugging Face Qwen2ForCausalLM (or Qwen2Model); it is run frozen (eval, no grad) and is
            left in its original mode and on its original device.
        tokenizer: the model's tokenizer.
        documents: texts, e.g. router_upcycling.text.read_documents(paths).
        max_tokens: calibration tokens in total (fewer if the documents run out; a warning says so).
        seq_length: chunk length.
        batch_size: chunks per forward; default: default_batch_size(seq_length, device). The result does
            not depend on it.
        device: where to run; default: the model's device if it is an accelerator, else CUDA when
            available, else CPU.
        progress: show a tqdm bar counting tokens.
        after_norm: QK-norm models only: average after the per-head norm (k_norm, q_norm), else before it.
        projection: "k" (keys, one per KV head) or "q" (queries, one per query head).

    Returns:
        AverageKeys: the keys [L, H_kv, d_h] (float32, on CPU) and the number of tokens they average over.
    """
    device = torch.device(device) if device is not None else _default_device(model)
    chunks = token_chunks(documents, tokenizer, max_tokens, seq_length)
    decoder = _decoder(model)
    original_device, was_training = next(model.parameters()).device, model.training
    model.eval().to(device)
    num_heads = model.config.num_key_value_heads if projection == "k" else model.config.num_attention_heads
    layers = decoder.layers
    if after_norm:
        norm = f"{projection}_norm"
        sums = _NormOutputSums(layers, norm, num_heads, getattr(layers[0].self_attn, norm).weight.shape[0], device)
    else:
        sums = _KeyInputSums(layers, device)
    try:
        num_tokens = _run_over_chunks(
            decoder, sums, chunks, batch_size or default_batch_size(seq_length, device), device, progress, max_tokens
        )
    finally:
        model.train(was_training).to(original_device)
    if num_tokens == 0:
        raise TextDataError("the calibration documents hold no tokens")
    if num_tokens < max_tokens:
        logger.warning("calibration used %d tokens: the documents ran out before the %d asked for", num_tokens, max_tokens)
    means = sums.sums.cpu() / num_tokens
    averages = means if after_norm else _projections_of_mean_input(layers, means, projection)  # [L, heads(, d_h)]
    return AverageKeys(averages.reshape(len(layers), num_heads, -1).float().cpu(), num_tokens)


def _run_over_chunks(
    decoder: torch.nn.Module, sums, chunks: Iterable[List[int]], batch_size: int, device: torch.device, progress: bool,
    max_tokens: int,
) -> int:
    """Run the decoder over the chunks with the sums' hooks in place; returns the number of tokens."""
    num_tokens = 0
    try:
        with torch.no_grad(), tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="calibration", disable=not progress) as bar:
            for batch in equal_length_batches(chunks, batch_size):
                input_ids = torch.tensor(batch, dtype=torch.long, device=device)  # [B, S]
                decoder(input_ids=input_ids, use_cache=False)
                num_tokens += input_ids.numel()
                bar.update(input_ids.numel())
    finally:
        sums.remove()
    return num_tokens
