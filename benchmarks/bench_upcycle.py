"""Upcycling cost for a Qwen1.5-0.5B-shaped model (d 1024, 16 heads, 24 layers, FFN 2816, vocab 151936,
tied embeddings, random bf16 weights built here) to 8 experts.

Prints wall time against the least possible work (read the dense file, write the MoE's bytes),
target <= 1.5x, both for the conversion itself and for the whole command (which adds a fixed
~5-8 s of importing megatron-core), and the converter's peak physical memory (PSS of the process
and its checkpoint-writer children, sampled every 50 ms) against the dense file size, target
<= 2.5x (holding all expert copies costs about 5x).

    .venv/bin/python benchmarks/bench_upcycle.py [--workdir DIR] [--router linear|mor]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

from router_upcycling.settings.routers import BASELINE_ROUTER, DEFAULT_ROUTER, get_router

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SHAPE = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=16, num_hidden_layers=24,
             intermediate_size=2816, vocab_size=151936)
NUM_EXPERTS = 8


def build_dense(folder: str) -> int:
    """A Qwen1.5-0.5B-shaped dense checkpoint with random bf16 weights; returns its file size in bytes."""
    from transformers import Qwen2Config

    from router_upcycling.testing import train_tokenizer

    d, ffn, layers = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_hidden_layers"]
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": rand(SHAPE["vocab_size"], d), "model.norm.weight": torch.ones(d, dtype=torch.bfloat16)}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rand(d, d), p + "self_attn.q_proj.bias": rand(d),
            p + "self_attn.k_proj.weight": rand(d, d), p + "self_attn.k_proj.bias": rand(d),
            p + "self_attn.v_proj.weight": rand(d, d), p + "self_attn.v_proj.bias": rand(d),
            p + "self_attn.o_proj.weight": rand(d, d),
            p + "mlp.gate_proj.weight": rand(ffn, d), p + "mlp.up_proj.weight": rand(ffn, d),
            p + "mlp.down_proj.weight": rand(d, ffn),
        })
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config = Qwen2Config(**SHAPE, tie_word_embeddings=True, max_position_embeddings=32768, rms_norm_eps=1e-6)
    config.architectures = ["Qwen2ForCausalLM"]
    config.save_pretrained(folder)
    train_tokenizer().save_pretrained(folder)
    return os.path.getsize(os.path.join(folder, "model.safetensors"))


def least_possible_work(dense_dir: str, target: str) -> float:
    """Seconds to read the dense file and write as many bytes as the MoE checkpoint holds."""
    start = time.perf_counter()
    dense = load_file(os.path.join(dense_dir, "model.safetensors"))
    ffn = [name for name in dense if ".mlp." in name]
    moe = {name: t for name, t in dense.items() if name not in ffn}
    for name in ffn:
        for expert in range(NUM_EXPERTS):
            moe[f"{name}.{expert}"] = dense[name]  # same storage: the copies cost writing, not memory
    with open(target, "wb") as f:
        for tensor in moe.values():
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - start


CHILD = """
import json, sys, time
start = time.perf_counter()
from router_upcycling.commands.convert import main
import router_upcycling.convert.upcycle, router_upcycling.mcore.model, transformers  # the fixed cost, timed apart
imported = time.perf_counter()
if __name__ == "__main__":
    main({args!r})
    print(json.dumps({{"import_s": imported - start, "convert_s": time.perf_counter() - imported}}))
"""


def tree_pss(process) -> int:
    """Physical memory of a process and its children (PSS: shared pages counted once in total)."""
    import psutil

    total = 0
    for proc in [process] + process.children(recursive=True):
        try:
            total += proc.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def run_converter(args: list) -> tuple:
    """(seconds of the whole command, seconds after imports, seconds of imports, peak PSS bytes)."""
    import psutil

    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(repo=REPO, args=args)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=REPO)
    process, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        peak = max(peak, tree_pss(process))
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    out, err = child.communicate()
    if child.returncode:
        sys.exit(err)
    timing = json.loads(out.strip().splitlines()[-1])
    return seconds, timing["convert_s"], timing["import_s"], peak


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    parser.add_argument("--router", choices=[BASELINE_ROUTER, DEFAULT_ROUTER], default=BASELINE_ROUTER,
                        help="mor adds calibration (a forward pass of the dense model) on top of the I/O measured here")
    parser.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens when --router mor")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_upcycle_")
    try:
        dense_dir = os.path.join(workdir, "dense")
        dense_bytes = build_dense(dense_dir)
        baseline = least_possible_work(dense_dir, os.path.join(workdir, "floor.bin"))
        os.remove(os.path.join(workdir, "floor.bin"))
        convert_args = ["upcycle", "--hf-model", dense_dir, "--output", os.path.join(workdir, "moe"),
                        "--num-experts", str(NUM_EXPERTS), "--router", args.router, "--dtype", "bf16", "--force"]
        if get_router(args.router).needs_calibration:
            calib = os.path.join(workdir, "calib.jsonl")
            with open(calib, "w") as f:
                for i in range(2000):
                    f.write(json.dumps({"text": f"Document {i}: the quick brown fox jumps over the lazy dog."}) + "\n")
            convert_args += ["--calib-data", calib, "--calib-tokens", str(args.calib_tokens), "--calib-seq-length", "1024"]
        seconds, convert_s, import_s, peak = run_converter(convert_args)
        moe_bytes = folder_bytes(os.path.join(workdir, "moe"))
        print(f"dense file            {dense_bytes / 2**30:.2f} GiB")
        print(f"MoE checkpoint        {moe_bytes / 2**30:.2f} GiB ({NUM_EXPERTS} experts)")
        print(f"least possible work   {baseline:.1f} s (read dense + write MoE bytes)")
        print(f"upcycle, conversion   {convert_s:.1f} s  -> {convert_s / baseline:.2f}x the least possible work (target <= 1.5x)")
        print(f"upcycle, whole command {seconds:.1f} s (of which {import_s:.1f} s importing megatron-core and transformers)"
              f" -> {seconds / baseline:.2f}x")
        print(f"peak memory (PSS)     {peak / 2**30:.2f} GiB -> {peak / dense_bytes:.2f}x the dense file (target <= 2.5x)")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
