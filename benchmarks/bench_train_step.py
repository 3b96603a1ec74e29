"""Full training-step time (forward, backward, megatron-core DDP gradient reduction, Adam) through the
trainer's own step (router_upcycling.train.step: megatron-core's schedule, DDP and optimizer, the path GPUs
run), comparing two models with the same weights:

- `--compare routers` (default): the Mixture-of-Routers router vs megatron-core's linear router;
- `--compare health`: MoR with the trainer's RoutingCounter (routing health and token shares counted at
  every router call, reported after every step as with --log-interval 1) vs MoR without it.

    .venv/bin/python benchmarks/bench_train_step.py [--compare health] [--steps 20 --warmup 3 --hidden 256 --layers 4 --experts 8 --seq 256 --micro 4]

Prints the median and fastest wall time and the median CPU time of a step of each (measured interleaved,
alternating which goes first, so machine noise hits both alike) and their ratios; the target is <= 1.02
for either comparison. With `--compare health` it also times the counting inside the steps (the counter's sums in every router call and
its report), a figure that machine noise moves far less than a difference of two step times. Timed on the
host: on CPU that is the work itself; on a GPU, host time only (kernels run asynchronously).
"""
import argparse
import statistics
import sys
import time

import torch

from router_upcycling.mcore.parallel import current_device, initialize_distributed
from router_upcycling.selfcheck.speed import synthetic_batches
from router_upcycling.settings.moe import MoESettings
from router_upcycling.settings.routers import BASELINE_ROUTER, DEFAULT_ROUTER
from router_upcycling.testing import qwen2_architecture
from router_upcycling.train import metrics
from router_upcycling.train.build import build_model, wrap_for_training
from router_upcycling.train.config import TrainingConfig
from router_upcycling.train.source import ModelSource
from router_upcycling.train.step import make_forward_step, train_step

# --compare: (name, router, count routing health) of the candidate, then of the baseline it is divided by
COMPARISONS = {
    "routers": ((DEFAULT_ROUTER, DEFAULT_ROUTER, False), (BASELINE_ROUTER, BASELINE_ROUTER, False)),
    "health": ((f"{DEFAULT_ROUTER}+health", DEFAULT_ROUTER, True), (DEFAULT_ROUTER, DEFAULT_ROUTER, False)),
}


class CountingClock:
    """Seconds spent in the counter's work inside real steps: every routing_sums call (the counter's one
    function per router call, timed through the metrics module's name) and every report()."""

    def __init__(self) -> None:
        self.seconds = 0.0
        routing_sums = metrics.routing_sums

        def timed(*args):
            start = time.perf_counter()
            sums = routing_sums(*args)
            self.seconds += time.perf_counter() - start
            return sums

        metrics.routing_sums = timed

    def report(self, counter: "metrics.RoutingCounter") -> None:
        start = time.perf_counter()
        counter.report()
        self.seconds += time.perf_counter() - start

    def lap(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="routers",
                        help="routers: MoR vs linear; health: MoR with vs without routing-health counting (default routers)")
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
    train_config = TrainingConfig(train_iters=1, seq_length=bench.seq, micro_batch_size=bench.micro,
                                  global_batch_size=bench.micro, lr=1e-4, transformer_impl="local")
    arch = qwen2_architecture(bench.hidden, bench.layers, bench.heads, bench.vocab)
    forward_step_func = make_forward_step(bench.seq, current_device())
    runs, counters = {}, {}
    for name, router, health in COMPARISONS[bench.compare]:
        moe = MoESettings(num_experts=bench.experts, topk=2, router=router)
        torch.manual_seed(0)
        model = build_model(train_config, ModelSource({}, arch, moe, None, "", None))
        if health:
            counters[name] = metrics.RoutingCounter(model, current_device())
        runs[name] = wrap_for_training(model, train_config)

    times = {name: [] for name in runs}  # (wall, CPU) seconds per step
    clock, counting = CountingClock(), []
    for step in range(bench.warmup + bench.steps):
        order = list(runs) if step % 2 else list(runs)[::-1]  # alternate who goes first
        for name in order:
            model, optimizer = runs[name]
            start, cpu_start = time.perf_counter(), time.process_time()
            train_step(model, optimizer, synthetic_batches(bench.micro, bench.seq, bench.vocab, current_device()),
                       forward_step_func, 1, train_config, current_device())
            if name in counters:
                clock.report(counters[name])
            if step >= bench.warmup:
                times[name].append((time.perf_counter() - start, time.process_time() - cpu_start))
                if name in counters:
                    counting.append(clock.lap())
            clock.lap()

    medians = {name: statistics.median(wall for wall, _ in t) for name, t in times.items()}
    fastest = {name: min(wall for wall, _ in t) for name, t in times.items()}
    cpu = {name: statistics.median(cpu for _, cpu in t) for name, t in times.items()}
    candidate, baseline = (name for name, _, _ in COMPARISONS[bench.compare])
    print(f"command: {' '.join([sys.executable.split('/')[-1]] + sys.argv)}")
    print(f"model: d={bench.hidden}, {bench.layers} layers, {bench.heads} heads, {bench.experts} experts top-2, "
          f"seq {bench.seq}, micro-batch {bench.micro}, vocab {bench.vocab}, {torch.get_num_threads()} threads, "
          f"median of {bench.steps} steps after {bench.warmup} warmup")
    for name in runs:
        print(f"{name:>10}: median {1000 * medians[name]:8.1f} ms/step, fastest {1000 * fastest[name]:8.1f} ms/step, "
              f"median CPU time {1000 * cpu[name]:8.1f} ms/step")
    print(f"ratio {candidate}/{baseline}: median {medians[candidate] / medians[baseline]:.3f}, fastest "
          f"{fastest[candidate] / fastest[baseline]:.3f}, CPU time {cpu[candidate] / cpu[baseline]:.3f} (target <= 1.02; "
          "on a shared machine trust the fastest and the CPU time: other jobs lengthen wall times, not this process's CPU time)")
    if counting:
        inside = statistics.median(counting)
        print(f"counting inside the {candidate} steps: median {1000 * inside:.2f} ms per step ({bench.layers} router calls "
              f"+ 1 report) = {100 * inside / medians[baseline]:.2f}% of the median {baseline} step")

if __name__ == "__main__":
    main()
