"""The three analyses (paper sections 5.3 and 5.4), each returning its JSON-ready result.

- routing: average routing weight of each expert per domain at one layer (paper Fig. 5). A
  token's routing weight is its top-k weight for the chosen experts, zero for the others; the
  average runs over every token of the domain's texts, so each domain's weights sum to 1 when
  the model renormalises its top-k weights.
- specialization: per layer, the mean over tokens and over expert pairs i < j of the cosine
  similarity between expert i's and expert j's outputs on the same token (every expert applied
  to every token of the layer's MoE input, routing weights not applied; paper Fig. 6).
- load: per layer, the share of routing slots (tokens x k) each expert received; sums to 1,
  uniform = 1/N.
- health: per layer, the routing health the trainer logs (max_share, dead_experts, top1_weight,
  logit_std, entropy), from the same functions (router_upcycling.routing_stats) on the gates'
  logits and chosen experts.
"""
from typing import Dict, List, Optional

import torch
from tqdm import tqdm

from router_upcycling.analyze.hooks import moe_layers, watch_gates
from router_upcycling.analyze.inputs import AnalysisError
from router_upcycling.analyze.stats import (
    dense_routing_weights, expert_outputs, expert_token_counts, pairwise_cosine_sum, routing_map_of,
)
from router_upcycling.routing_stats import counted_tokens, routing_health, routing_sums, sums_width
from router_upcycling.text import equal_length_batches

# Expert outputs are built for this many tokens at a time: [N, block, d] floats stay small.
TOKEN_BLOCK = 512


def num_experts_of(model: torch.nn.Module) -> int:
    return next(iter(moe_layers(model).values())).experts.gate_up_proj.shape[0]


def pick_layer(model: torch.nn.Module, layer: Optional[int]) -> int:
    """The requested decoder layer (negative counts from the end), default the last MoE layer."""
    layers = list(moe_layers(model))
    if layer is None:
        return layers[-1]
    num_layers = max(layers) + 1
    resolved = layer + num_layers if layer < 0 else layer
    if resolved not in layers:
        raise AnalysisError(f"layer {layer} is not an MoE layer; MoE layers: {layers}")
    return resolved


@torch.no_grad()
def _forward_all(model: torch.nn.Module, chunks: List[List[int]], batch_size: int, desc: str) -> None:
    """Run the decoder (no LM head) over every chunk of token ids."""
    device = next(model.parameters()).device
    total = sum(len(chunk) for chunk in chunks)
    with tqdm(total=total, desc=desc, unit="tok") as progress:
        for batch in equal_length_batches(chunks, batch_size):
            input_ids = torch.tensor(batch, dtype=torch.long, device=device)  # [B, S]
            model.base_model(input_ids=input_ids, use_cache=False)
            progress.update(input_ids.numel())


def routing_weights_by_domain(model: torch.nn.Module, domain_chunks: Dict[str, List[List[int]]], layer: int, batch_size: int) -> dict:
    """Average routing weight of each expert per domain at `layer`."""
    num_experts = num_experts_of(model)
    domains = {}
    for name, chunks in domain_chunks.items():
        total = torch.zeros(num_experts, dtype=torch.float64)
        tokens = [0]

        def accumulate(_, hidden, logits, top_k_weights, top_k_index):
            total.add_(dense_routing_weights(top_k_weights, top_k_index, num_experts).sum(0).double().cpu())
            tokens[0] += top_k_index.shape[0]

        with watch_gates(model, accumulate, layers=[layer]):
            _forward_all(model, chunks, batch_size, desc=f"routing {name}")
        domains[name] = {"weights": (total / tokens[0]).tolist(), "tokens": tokens[0]}
    return {"layer": layer, "num_experts": num_experts, "domains": domains}


def expert_similarity_by_layer(model: torch.nn.Module, chunks: List[List[int]], batch_size: int) -> dict:
    """Mean pairwise cosine similarity of expert outputs, per MoE layer."""
    blocks = moe_layers(model)
    num_experts = num_experts_of(model)
    sums = {layer: 0.0 for layer in blocks}
    tokens = {layer: 0 for layer in blocks}

    def accumulate(layer, hidden, logits, top_k_weights, top_k_index):
        for block in hidden.split(TOKEN_BLOCK):
            sums[layer] += pairwise_cosine_sum(expert_outputs(blocks[layer].experts, block)).item()
            tokens[layer] += block.shape[0]

    with watch_gates(model, accumulate):
        _forward_all(model, chunks, batch_size, desc="expert outputs")
    pairs = num_experts * (num_experts - 1) // 2
    return {
        "layers": list(blocks),
        "mean_cosine_similarity": [sums[layer] / (tokens[layer] * pairs) for layer in blocks],
        "tokens": tokens[next(iter(blocks))],
        "num_experts": num_experts,
    }


def expert_load_by_layer(model: torch.nn.Module, chunks: List[List[int]], batch_size: int) -> dict:
    """Share of routing slots per expert, per MoE layer."""
    blocks = moe_layers(model)
    num_experts = num_experts_of(model)
    counts = {layer: torch.zeros(num_experts, dtype=torch.float64) for layer in blocks}
    tokens = [0]

    def accumulate(layer, hidden, logits, top_k_weights, top_k_index):
        counts[layer].add_(expert_token_counts(top_k_index, num_experts).double().cpu())
        if layer == next(iter(blocks)):
            tokens[0] += top_k_index.shape[0]

    with watch_gates(model, accumulate):
        _forward_all(model, chunks, batch_size, desc="expert load")
    return {
        "layers": list(blocks),
        "share": [(counts[layer] / counts[layer].sum()).tolist() for layer in blocks],
        "tokens": tokens[0],
        "num_experts": num_experts,
    }


def routing_health_by_layer(model: torch.nn.Module, chunks: List[List[int]], batch_size: int) -> dict:
    """Routing health of every MoE layer over every token of the chunks (router_upcycling.routing_stats)."""
    blocks = moe_layers(model)
    num_experts = num_experts_of(model)
    device = next(model.parameters()).device
    sums = torch.zeros(len(blocks), sums_width(num_experts), dtype=torch.float64, device=device)  # [L, W]
    rows = {layer: row for row, layer in enumerate(blocks)}

    def accumulate(layer, hidden, logits, top_k_weights, top_k_index):
        sums[rows[layer]] += routing_sums(logits, routing_map_of(top_k_index, num_experts))

    with watch_gates(model, accumulate):
        _forward_all(model, chunks, batch_size, desc="routing health")
    return {
        "layers": list(blocks),
        "routing_health": routing_health(sums),
        "tokens": int(counted_tokens(sums)[0].item()),
        "num_experts": num_experts,
        "topk": model.config.num_experts_per_tok,
    }
