"""Full training-step time (forward, backward, megatron-core DDP gradient reduction, Adam) with the
Mixture-of-Routers router vs megatron-core's linear router, on CPU, through the trainer's own step
(router_upcycling.train.step: megatron-core's schedule, DDP and optimizer, the path GPUs run).

    .venv/bin/python benchmarks/bench_train_step.py [--steps 20 --warmup 3 --hidden 256 --layers 4 --experts 8 --seq 256 --micro 4]

Prints the median and fastest step time of each router (measured interleaved, alternating which goes
first, so machine noise hits both alike) and their ratios; the target is MoR / linear <= 1.02.
"""
import argparse
import statistics
import sys
import time

import torch

from router_upcycling.mcore.model import MoESettings
from router_upcycling.mcore.parallel import current_device, initialize_distributed
from router_upcycling.selfcheck.speed import synthetic_batches
from router_upcycling.train.arguments import build_parser
from router_upcycling.train.build import ModelSource, build_model, wrap_for_training
from router_upcycling.train.step import make_forward_step, train_step


ROUTERS = ("mor", "linear")


def hf_config(hidden: int, layers: int, heads: int, vocab: int) -> dict:
    return {"hidden_size": hidden, "intermediate_size": hidden * 11 // 4, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": vocab,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per router (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    bench = parser.parse_args()

    initialize_distributed(seed=0)
    train_args = build_parser().parse_args([
        "--train-iters", "1", "--seq-length", str(bench.seq), "--micro-batch-size", str(bench.micro),
        "--global-batch-size", str(bench.micro), "--lr", "1e-4",
    ])
    config = hf_config(bench.hidden, bench.layers, bench.heads, bench.vocab)
    forward_step_func = make_forward_step(bench.seq, current_device())
    runs = {}
    for router in ROUTERS:
        moe = MoESettings(num_experts=bench.experts, topk=2, router=router)
        torch.manual_seed(0)
        model = build_model(train_args, ModelSource({"hf_config": config, "moe": moe.to_dict(config)}, None, "", None))
        runs[router] = wrap_for_training(model, train_args)

    times = {router: [] for router in runs}
    for step in range(bench.warmup + bench.steps):
        order = list(runs) if step % 2 else list(runs)[::-1]  # alternate who goes first
        for router in order:
            model, optimizer = runs[router]
            start = time.perf_counter()
            train_step(model, optimizer, synthetic_batches(bench.micro, bench.seq, bench.vocab, current_device()),
                       forward_step_func, 1, train_args, current_device())
            if step >= bench.warmup:
                times[router].append(time.perf_counter() - start)

    medians = {router: statistics.median(t) for router, t in times.items()}
    fastest = {router: min(t) for router, t in times.items()}
    print(f"command: {' '.join([sys.executable.split('/')[-1]] + sys.argv)}")
    print(f"model: d={bench.hidden}, {bench.layers} layers, {bench.heads} heads, {bench.experts} experts top-2, "
          f"seq {bench.seq}, micro-batch {bench.micro}, vocab {bench.vocab}, {torch.get_num_threads()} threads, "
          f"median of {bench.steps} steps after {bench.warmup} warmup")
    for router in runs:
        print(f"{router:>6}: median {1000 * medians[router]:8.1f} ms/step, fastest {1000 * fastest[router]:8.1f} ms/step")
    print(f"ratio mor/linear: median {medians['mor'] / medians['linear']:.3f}, fastest "
          f"{fastest['mor'] / fastest['linear']:.3f} (target <= 1.02; on a shared machine trust the fastest)")


if __name__ == "__main__":
    main()
