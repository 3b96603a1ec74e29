"""Host memory of a CPU training run over many steps: flat is the target (no per-step leak).

    .venv/bin/python benchmarks/bench_train_memory.py [--steps 300 --seq 128 --global-batch 16 --micro 4]

Builds a tiny upcycled model (d=64, 2 layers, 4 experts, Mixture-of-Routers) and token data in a
temporary folder, runs `python -m router_upcycling.train` on 1 rank for --steps steps, and samples the
training process's resident memory each time it prints a step. Prints the memory at the first and last
logged step and the growth per step over the second half of the run (a least-squares slope).
To measure another checkout's code, put it first on PYTHONPATH.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import psutil

STEP_LINE = re.compile(r"^step (\d+)/")


def make_inputs(root: str) -> dict:
    from router_upcycling.convert.upcycle import CalibrationSettings, upcycle
    from router_upcycling.settings.moe import MoESettings
    from router_upcycling.settings.routers import DEFAULT_ROUTER
    from router_upcycling.testing import SAMPLE_TEXT, make_dense_qwen2, write_token_documents

    dense = make_dense_qwen2(os.path.join(root, "dense"), num_heads=8, num_kv_heads=8, seed=1)
    calib = os.path.join(root, "calib.jsonl")
    with open(calib, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXT)
    checkpoint = upcycle(dense, os.path.join(root, "moe"), MoESettings(router=DEFAULT_ROUTER, num_experts=4, topk=2),
                         CalibrationSettings(files=[calib], tokens=200, seq_length=16), dtype="fp32", progress=False)
    write_token_documents(os.path.join(root, "tokens_text_document"), num_docs=2000)
    return {"checkpoint": checkpoint, "data": os.path.join(root, "tokens_text_document")}


def slope(points) -> float:
    """Least-squares slope of (x, y) points."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--seq", type=int, default=128, help="sequence length (default 128)")
    parser.add_argument("--global-batch", type=int, default=16, help="samples per step (default 16)")
    parser.add_argument("--micro", type=int, default=4, help="micro-batch size (default 4)")
    parser.add_argument("--log-interval", type=int, default=10, help="steps between samples (default 10)")
    bench = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:
        inputs = make_inputs(root)
        command = [sys.executable, "-m", "router_upcycling.train", "--pretrained-checkpoint", inputs["checkpoint"],
                   "--data-path", inputs["data"], "--split", "100,0,0", "--seq-length", str(bench.seq),
                   "--micro-batch-size", str(bench.micro), "--global-batch-size", str(bench.global_batch),
                   "--train-iters", str(bench.steps), "--log-interval", str(bench.log_interval), "--eval-iters", "0",
                   "--lr", "1e-3", "--lr-warmup-iters", "10"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        rank = psutil.Process(process.pid)
        samples, output = [], []
        for line in process.stdout:
            output.append(line)
            match = STEP_LINE.match(line)
            if match:
                samples.append((int(match.group(1)), rank.memory_info().rss / 2**20))
        if process.wait() != 0 or len(samples) < 4:
            sys.exit("training failed:\n" + "".join(output[-30:]))

    second_half = [s for s in samples if s[0] > bench.steps // 2]
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"run: 1 rank, tiny MoR model, seq {bench.seq}, global batch {bench.global_batch}, micro-batch {bench.micro}, "
          f"{bench.steps} steps")
    print(f"resident memory: step {samples[0][0]}: {samples[0][1]:.0f} MiB, step {samples[-1][0]}: {samples[-1][1]:.0f} MiB, "
          f"peak {max(m for _, m in samples):.0f} MiB")
    print(f"growth over steps {second_half[0][0]}-{second_half[-1][0]}: {slope(second_half):+.3f} MiB/step (target: ~0)")


if __name__ == "__main__":
    main()
