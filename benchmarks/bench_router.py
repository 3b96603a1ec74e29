"""Forward + backward of a small megatron-core MoE model on CPU: Mixture-of-Routers vs the linear router.

    .venv/bin/python benchmarks/bench_router.py [--steps 30 --hidden 256 --layers 4 --experts 8 --seq 256 --batch 4]
                                                [--query-norm]

Both models have the same weights except the router; steps are interleaved (alternating which
router goes first) so machine noise hits both alike. Prints median and fastest step times and
the MoR / linear ratio; the target is <= 1.02x. Also times the router alone (gating). --query-norm adds the
Mixture-of-Routers that normalises its queries head by head (`upcycle --router-qk-norm inside`), which computes
every router's query instead of one folded gate.
"""
import argparse
import statistics
import time

import torch

from router_upcycling.mcore.model import build_gpt_model, causal_attention_mask, transformer_config
from router_upcycling.mcore.parallel import initialize_distributed
from router_upcycling.settings.moe import MoESettings
from router_upcycling.settings.routers import BASELINE_ROUTER, DEFAULT_ROUTER
from router_upcycling.testing import qwen2_architecture


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--query-norm", action="store_true", help="also time MoR with the query norm inside the routers")
    args = parser.parse_args()

    initialize_distributed(seed=0)
    arch = qwen2_architecture(args.hidden, args.layers, args.heads, vocab_size=4096)
    variants = {DEFAULT_ROUTER: MoESettings(router=DEFAULT_ROUTER, num_experts=args.experts, topk=args.topk),
                BASELINE_ROUTER: MoESettings(router=BASELINE_ROUTER, num_experts=args.experts, topk=args.topk)}
    if args.query_norm:
        variants["mor+qnorm"] = MoESettings(router=DEFAULT_ROUTER, num_experts=args.experts, topk=args.topk, query_norm=True)
    models = {}
    for name, moe in variants.items():
        torch.manual_seed(0)
        models[name] = build_gpt_model(arch, moe, transformer_config(arch, moe, moe_aux_loss_coeff=0.01))
    tokens = torch.randint(0, 4096, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(args.seq)[None].expand(args.batch, -1)
    mask = causal_attention_mask(args.seq)

    def step(model):
        model.zero_grad(set_to_none=True)
        model(tokens, positions, mask, labels=tokens).mean().backward()

    x = torch.randn(args.batch * args.seq, args.hidden)

    def gating(model):
        router = model.decoder.layers[0].mlp.router
        router.gating(x).sum().backward()

    results = {name: {"step": [], "router": []} for name in models}
    order = list(models)
    for i in range(args.warmup + args.steps):
        for name in order:
            step_time = timed(lambda: step(models[name]))
            router_time = timed(lambda: gating(models[name]))
            if i >= args.warmup:
                results[name]["step"].append(step_time)
                results[name]["router"].append(router_time)
        order.reverse()

    print(f"model: d={args.hidden}, {args.layers} layers, {args.experts} experts top-{args.topk}, "
          f"batch {args.batch} x seq {args.seq}, {torch.get_num_threads()} threads, {args.steps} steps")
    for name, times in results.items():
        print(f"{name:9s} forward+backward median {1e3 * statistics.median(times['step']):8.1f} ms, "
              f"fastest {1e3 * min(times['step']):8.1f} ms | router gating fwd+bwd median "
              f"{1e3 * statistics.median(times['router']):.3f} ms")
    mor, linear = results[DEFAULT_ROUTER]["step"], results[BASELINE_ROUTER]["step"]
    median_ratio, fastest_ratio = statistics.median(mor) / statistics.median(linear), min(mor) / min(linear)
    print(f"MoR / linear: median {median_ratio:.3f}x, fastest {fastest_ratio:.3f}x (target <= 1.02x)")
    if args.query_norm:
        normed = results["mor+qnorm"]["step"]
        print(f"MoR with the query norm / linear: median {statistics.median(normed) / statistics.median(linear):.3f}x, "
              f"fastest {min(normed) / min(linear):.3f}x")


if __name__ == "__main__":
    main()
