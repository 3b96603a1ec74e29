"""Forward time of the exported `mor` model against stock Qwen2MoeForCausalLM holding the same weights.

Both folders come from the exporter (the stock one with the Mixture-of-Routers folded into its linear
gate), so both route every token to the same experts; the difference is the router's cost and the
modeling code around it. Runs on CPU in float32.

    python benchmarks/bench_hf_forward.py --hidden 512 --layers 4 --experts 8 --intermediate 1408 --seq 512
"""
import argparse
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

from router_upcycling.convert.hf_export import expected_mor_shapes, mor_config, write_mor_folder, write_stock_folder
from router_upcycling.settings.moe import MoESettings
from router_upcycling.settings.routers import DEFAULT_ROUTER
from router_upcycling.testing import tiny_qwen2_config, train_tokenizer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512, help="hidden size d")
    parser.add_argument("--heads", type=int, default=8, help="attention heads H")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--experts", type=int, default=8, help="experts per layer N")
    parser.add_argument("--topk", type=int, default=2, help="experts per token k")
    parser.add_argument("--routers", type=int, default=8, help="Mixture-of-Routers routers R")
    parser.add_argument("--intermediate", type=int, default=1408, help="expert intermediate size I")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=1, help="sequences per forward")
    parser.add_argument("--repeats", type=int, default=7, help="timed forwards per model (median reported)")
    parser.add_argument(
        "--experts-implementation", default="eager",
        help="transformers experts kernel for both models: eager (fastest on CPU here), grouped_mm (transformers' default), batched_mm",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    return parser.parse_args()


def random_tensors(config, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights for every tensor of the `mor` model (norms at 1), std 0.02 elsewhere."""
    return {
        name: torch.ones(shape) if "norm" in name else 0.02 * torch.randn(shape, generator=generator)
        for name, shape in expected_mor_shapes(config).items()
    }


def median_forward_seconds(models: dict, input_ids: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median wall time per model; runs alternate between models so machine noise hits both alike."""
    times = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(input_ids)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(input_ids)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_config = tiny_qwen2_config(
        vocab_size=1024, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
        intermediate_size=args.intermediate, max_position_embeddings=max(args.seq, 256),
    ).to_dict()
    moe = MoESettings(num_experts=args.experts, topk=args.topk, router=DEFAULT_ROUTER, num_routers=args.routers)
    tensors = random_tensors(mor_config(hf_config, moe, torch.float32), torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as work:
        train_tokenizer().save_pretrained(f"{work}/tokenizer")
        write_mor_folder(tensors, hf_config, moe, f"{work}/tokenizer", f"{work}/mor", dtype=torch.float32)
        write_stock_folder(tensors, hf_config, moe, f"{work}/tokenizer", f"{work}/stock", dtype=torch.float32)
        load = dict(dtype=torch.float32, experts_implementation=args.experts_implementation)
        models = {
            "mor": AutoModelForCausalLM.from_pretrained(f"{work}/mor", trust_remote_code=True, **load).eval(),
            "qwen2_moe": AutoModelForCausalLM.from_pretrained(f"{work}/stock", **load).eval(),
        }
    input_ids = torch.randint(0, 1024, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        max_diff = (models["mor"](input_ids).logits - models["qwen2_moe"](input_ids).logits).abs().max().item()
    seconds = median_forward_seconds(models, input_ids, args.repeats)
    print(f"d={args.hidden} layers={args.layers} N={args.experts} k={args.topk} R={args.routers} I={args.intermediate} "
          f"tokens={args.batch}x{args.seq} experts_implementation={args.experts_implementation} threads={torch.get_num_threads()}")
    print(f"max |logit difference| mor vs qwen2_moe: {max_diff:.2e}")
    for name, value in seconds.items():
        print(f"{name:>10}: median forward {value * 1000:.1f} ms over {args.repeats} runs")
    print(f"ratio mor / qwen2_moe: {seconds['mor'] / seconds['qwen2_moe']:.3f}")


if __name__ == "__main__":
    main()
