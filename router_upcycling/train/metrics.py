"""What a run reports: a stdout line, `SAVE/metrics.jsonl`, TensorBoard and W&B (rank 0), plus per layer
the share of tokens each expert receives and the routing health, counted from the routers' calls.

Shapes: L MoE layers, N experts, T tokens of a micro-batch.
"""
import dataclasses
import json
import logging
import os
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from router_upcycling.outputs import write_text_atomic
from router_upcycling.routing_stats import expert_shares, routing_health, routing_sums, sums_width
from router_upcycling.settings.architecture import Architecture
from router_upcycling.train.config import TrainingConfig

log = logging.getLogger("router_upcycling.train")


class RoutingCounter:
    """Routing statistics of this pipeline stage's routers while training: per layer, the share of routed
    tokens each expert received and the routing health of router_upcycling.routing_stats.

    Every router's `routing(logits)` is wrapped (an instance attribute shadowing the method): megatron-core's
    router returns only (probs, routing_map), and the logits exist only as what its `forward` hands to
    `routing()`. The router's math is untouched; evaluation is not counted.
    Each call adds `routing_sums` into a [L, W] float64 tensor on the model's device (no host sync per
    layer and micro-batch), in rows of the model's global layer numbers, so summing over every rank
    gives the whole model: pipeline stages hold disjoint layers, and data-parallel, expert-parallel and
    sequence-parallel ranks route disjoint tokens. Every statistic is a ratio of sums, so layers whose
    forward is recomputed (activation recomputation counts them twice) still read right.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        config = model.config
        self.sums = torch.zeros(config.num_layers, sums_width(config.num_moe_experts), dtype=torch.float64, device=device)
        for layer in model.decoder.layers:
            layer.mlp.router.routing = self._observed(layer.mlp.router, layer.layer_number - 1)

    def _observed(self, router: torch.nn.Module, layer: int):
        routing = router.routing

        def observed(logits: torch.Tensor, *args, **kwargs):
            probs, routing_map = routing(logits, *args, **kwargs)
            if router.training:
                self.sums[layer] += routing_sums(logits, routing_map)
            return probs, routing_map

        return observed

    def report(self) -> Dict[str, list]:
        """Over all ranks since the last call, then reset: `expert_token_share` [L][N] and `routing_health`
        (one dict per layer, router_upcycling.routing_stats.HEALTH_KEYS)."""
        sums = self.sums.clone()
        dist.all_reduce(sums)
        self.sums.zero_()
        return {
            "expert_token_share": [[round(x, 5) for x in row] for row in expert_shares(sums).tolist()],
            "routing_health": [{key: round(value, 5) for key, value in layer.items()} for layer in routing_health(sums)],
        }


def health_summary(routing_health: List[Dict[str, float]]) -> float:
    """The stdout line's routing figure: the largest `max_share` of any layer (1/N = balanced; it rises as
    routing collapses onto few experts, and a dead expert raises the others' shares)."""
    return max(layer["max_share"] for layer in routing_health)


def logged_scalars(record: Dict) -> Dict[str, float]:
    """What TensorBoard and W&B get: the record's top-level numbers, and `routing_health/layer{l}/{name}`."""
    scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
    for layer, health in enumerate(record.get("routing_health") or []):
        scalars.update({f"routing_health/layer{layer}/{name}": value for name, value in health.items()})
    return scalars


def flops_per_token(arch: Architecture, num_experts: int, topk: int, seq_length: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward) of the active parameters and attention.

    Per layer forward: 2 x (q,k,v,o projections + topk SwiGLU experts) multiply-adds plus 2 x 2 x s x d
    for the attention scores and weighted values (full, not causal-halved, as Megatron-LM counts);
    plus the output layer. Router FLOPs are negligible and left out.
    """
    d, heads, head_dim = arch.hidden_size, arch.num_heads, arch.head_dim
    attention = d * head_dim * (2 * heads + 2 * arch.num_kv_heads)
    experts = topk * 3 * d * arch.ffn_hidden_size
    per_layer = 2 * (attention + experts) + 4 * seq_length * heads * head_dim
    forward = arch.num_layers * per_layer + 2 * d * arch.vocab_size
    return 3.0 * forward


class MetricsWriter:
    """Rank 0 writes; every logged step is one stdout line and one JSON line in SAVE/metrics.jsonl."""

    def __init__(self, config: TrainingConfig, is_writer: bool) -> None:
        self.is_writer = is_writer
        self.jsonl = os.path.join(config.save, "metrics.jsonl") if config.save and is_writer else None
        self.tensorboard = self._tensorboard(config.tensorboard_dir) if is_writer and config.tensorboard_dir else None
        self.wandb = self._wandb(config) if is_writer and config.wandb_project else None

    @staticmethod
    def _tensorboard(log_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("--tensorboard-dir given but the tensorboard package is not installed: no TensorBoard logs "
                        "(pip install tensorboard)")
            return None
        return SummaryWriter(log_dir=log_dir)

    @staticmethod
    def _wandb(config: TrainingConfig):
        try:
            import wandb
        except ImportError:
            log.warning("--wandb-project given but wandb is not installed: no W&B logs (pip install wandb)")
            return None
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        name = config.wandb_exp_name or (os.path.basename(os.path.abspath(config.save)) if config.save else None)
        return wandb.init(project=config.wandb_project, name=name, mode=mode, config=dataclasses.asdict(config),
                          dir=config.save or None)

    def rewind(self, iteration: int) -> None:
        """Drop the metrics.jsonl records of steps after `iteration` (a run that resumes from an older checkpoint, a
        newer one having been lost or damaged, trains those steps again); rewritten whole, then renamed."""
        if not self.jsonl or not os.path.isfile(self.jsonl):
            return
        with open(self.jsonl) as f:
            lines = [line for line in f if line.strip()]
        kept = [line for line in lines if json.loads(line).get("step", 0) <= iteration]
        if len(kept) < len(lines):
            write_text_atomic(self.jsonl, "".join(kept))
            log.info("metrics.jsonl: dropped %d records after step %d, which runs again", len(lines) - len(kept), iteration)

    def write(self, record: Dict, line: str) -> None:
        if not self.is_writer:
            return
        print(line, flush=True)
        if self.jsonl:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(record) + "\n")
        scalars = logged_scalars(record)
        if self.tensorboard:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, record["step"])
            self.tensorboard.flush()
        if self.wandb:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


def read_metrics(path: str) -> Tuple[Dict[int, float], Dict[int, float]]:
    """({step: lm_loss}, {step: val_loss}) of a run's metrics.jsonl."""
    train, valid = {}, {}
    with open(path) as f:
        for record in map(json.loads, filter(str.strip, f)):
            if "lm_loss" in record:
                train[record["step"]] = record["lm_loss"]
            if "val_loss" in record:
                valid[record["step"]] = record["val_loss"]
    return train, valid


def train_line(record: Dict, train_iters: int) -> str:
    parts = [f"step {record['step']}/{train_iters}", f"loss {record['lm_loss']:.4f}", f"lr {record['lr']:.3e}",
             f"grad norm {record['grad_norm']:.3f}", f"tokens/s {record['tokens_per_sec']:.0f}"]
    if record.get("load_balancing_loss") is not None:
        parts.append(f"lb loss {record['load_balancing_loss']:.4f}")
    if record.get("z_loss") is not None:
        parts.append(f"z loss {record['z_loss']:.4f}")
    if record.get("locality_loss") is not None:
        parts.append(f"locality loss {record['locality_loss']:.4f}")
    if record.get("routing_health"):
        parts.append(f"max share {health_summary(record['routing_health']):.3f}")
    if record.get("mfu") is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    parts.append(f"host mem {record['host_memory_mb']:.0f} MB")
    if record.get("gpu_max_allocated_mb") is not None:
        parts.append(f"GPU mem {record['gpu_max_allocated_mb']:.0f} MB")
    parts.append(f"ETA {format_seconds(record['eta_sec'])}")
    return " | ".join(parts)


def format_seconds(seconds: Optional[float]) -> str:
    seconds = int(seconds or 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class IntervalTimer:
    """Wall time of the steps since the last log (synchronising the device so times are real; a no-op on CPU)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def lap(self) -> float:
        torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed
