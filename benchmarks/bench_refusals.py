"""Wall time of a refused command: how long a user waits for the one-line error of a mistake.

    .venv/bin/python benchmarks/bench_refusals.py [--repeats 3]

Each case runs the real command in a fresh interpreter (config.json files only, no weights needed) and prints the
median wall time of --repeats runs and the error line. Every case should refuse well under 2 s: the settings are
checked before torch, transformers and megatron-core are imported.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def qwen2_config(**changes) -> dict:
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "num_attention_heads": 14,
            "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 4864, "vocab_size": 151936,
            "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": True, **changes}


def cases(work: Path) -> dict:
    models = {"unsupported": qwen2_config(architectures=["GPT2LMHeadModel"], model_type="gpt2"),
              "qwen2.5-0.5b": qwen2_config()}
    for name, config in models.items():
        (work / name).mkdir()
        (work / name / "config.json").write_text(json.dumps(config))
    convert = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py")]
    train = [sys.executable, "-m", "router_upcycling.train"]
    return {
        "upcycle: unsupported architecture": convert + ["upcycle", "--hf-model", str(work / "unsupported"), "--output",
                                                        str(work / "out"), "--router", "linear"],
        "upcycle: a router count the heads do not fit": convert + ["upcycle", "--hf-model", str(work / "qwen2.5-0.5b"),
                                                                   "--output", str(work / "out"), "--num-routers", "5"],
        "train --from-scratch: a router count that does not fit": train + [
            "--from-scratch", "--model-config", str(work / "qwen2.5-0.5b"), "--moe-router-type", "mor",
            "--num-routers", "5", "--data-path", str(work / "none"), "--train-iters", "1"],
        "export: no checkpoint": convert + ["export", "--checkpoint", str(work / "none"), "--output", str(work / "hf"),
                                            "--format", "mor"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per case (default 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for name, argv in cases(Path(folder)).items():
            seconds, line = [], ""
            for _ in range(args.repeats):
                start = time.perf_counter()
                result = subprocess.run(argv, capture_output=True, text=True, cwd=folder)
                seconds.append(time.perf_counter() - start)
                line = (result.stderr.strip().splitlines() or ["(no error)"])[-1]
            print(f"{statistics.median(seconds):6.2f} s  exit {result.returncode}  {name}: {line[:150]}")


if __name__ == "__main__":
    main()
