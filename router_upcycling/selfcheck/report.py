"""The self-check's results: `selfcheck.json` (headline figures first, then every measurement) and
`selfcheck.md` (tables to paste into an issue)."""
import importlib.metadata
import json
import os
import platform
import subprocess
from typing import List, Optional

from router_upcycling.resources import source_checkout
from router_upcycling.selfcheck.sizes import MOR

# docs/performance.md: the 8x0.5B recipe on H100s
TARGETS = {"tokens_per_sec": 55000, "mor_over_linear": 1.02}
DISTRIBUTIONS = {"megatron_core": ("megatron-core", "megatron_core"),
                 "transformers": ("transformers",), "transformer_engine": ("transformer-engine", "transformer_engine")}


def _installed_version(names) -> Optional[str]:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _git(*args: str) -> str:
    """git's answer about this checkout; empty where git or the checkout is missing (an installed package)."""
    checkout = source_checkout()
    if checkout is None:
        return ""
    try:
        result = subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True)
    except OSError:
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def versions() -> dict:
    """Python and package versions, and the repository commit (+dirty when the work tree has changes)."""
    commit = _git("rev-parse", "--short", "HEAD")
    if commit and _git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    import torch

    # torch's own version string carries the build (2.13.0+cu130, +cpu) that the package metadata leaves out
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            **{key: _installed_version(names) for key, names in DISTRIBUTIONS.items()},
            "router_upcycling_commit": commit or None}


def _largest_run(result: dict) -> Optional[dict]:
    runs = result.get("throughput") or []
    return max(runs, key=lambda run: run["world_size"]) if runs else None


def headline(result: dict) -> dict:
    """The figures an issue needs first, from the largest data-parallel run measured."""
    checks = [c for c in result.get("parity", []) if c["result"] != "skipped"]

    def worst(dtype: str) -> Optional[float]:
        diffs = [c["max_abs_diff"] for c in checks if c["dtype"] == dtype and c["max_abs_diff"] is not None]
        return max(diffs) if diffs else None

    run = _largest_run(result)
    mor = next((c for c in run["configurations"] if c["name"] == MOR.router and "error" not in c), {}) if run else {}
    parity_ok = all(c["result"] == "OK" for c in checks) if checks else None
    calibration = result.get("calibration") or {}
    return {
        "ok": parity_ok is not False,
        "parity_ok": parity_ok,
        "parity_max_abs_diff": worst("fp32"),
        "parity_max_abs_diff_bf16": worst("bf16"),
        "throughput_world_size": run["world_size"] if run else None,
        "tokens_per_sec": mor.get("tokens_per_sec_per_gpu"),
        "tflops_per_gpu": mor.get("tflops_per_gpu"),
        "mfu": mor.get("mfu"),
        "peak_memory_mb": mor.get("peak_memory_mb"),
        "mor_over_linear": run["mor_over_linear"] if run else None,
        "mor_over_linear_spread": run.get("mor_over_linear_spread") if run else None,
        "grouped_gemm_off_over_on": run["grouped_gemm_off_over_on"] if run else None,
        "calibration_tokens_per_sec": calibration.get("tokens_per_sec"),
    }


def finish(result: dict) -> dict:
    """The result with its headline figures recomputed and placed first."""
    body = {key: value for key, value in result.items() if key not in headline({})}
    return {**headline(result), **body, "targets": TARGETS}


def write(folder: str, result: dict) -> None:
    with open(os.path.join(folder, "selfcheck.json"), "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    with open(os.path.join(folder, "selfcheck.md"), "w") as f:
        f.write(markdown(result))


def _number(value, digits: int = 0, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{suffix}"


def _device_line(device: dict, versions: dict) -> str:
    if device["type"] == "cuda":
        tf32 = ", float32 matmuls in TF32" if device["tf32_matmuls"] else ""
        where = f"{device['count']} x {device['name']} ({device['memory_gb']} GB, CUDA {device['cuda']}{tf32})"
    else:
        where = f"CPU {device['name']}, torch threads: {device['threads']}"
    te = versions.get("transformer_engine") or "not installed"
    return (f"{where}; Python {versions['python']}, torch {versions['torch']}, megatron-core {versions['megatron_core']}, "
            f"transformers {versions['transformers']}, Transformer Engine {te}; commit {versions['router_upcycling_commit']}")


def _parity_table(checks: List[dict]) -> List[str]:
    lines = ["| parity check (tiny upcycled model) | dtype | max abs diff | tolerance | result |", "|---|---|---|---|---|"]
    for c in checks:
        diff = "n/a" if c["max_abs_diff"] is None else f"{c['max_abs_diff']:.2e}"
        tolerance = "" if c["tolerance"] is None else f"{c['tolerance']:.2e}"
        note = f" ({c['note']})".replace("|", "/") if c["note"] else ""  # a "|" would end the table cell
        lines.append(f"| {c['name']} | {c['dtype']} | {diff} | {tolerance} | {c['result']}{note} |")
    return lines


def _throughput_table(runs: List[dict]) -> List[str]:
    lines = ["| configuration | GPUs (ranks) | step, median (min) | tokens/s per GPU | TFLOP/s per GPU | MFU | peak memory, MB |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        for c in run["configurations"]:
            if "error" in c:
                lines.append(f"| {c['name']} | {run['world_size']} | {c['error']} | | | | |")
                continue
            mfu = "n/a" if c["mfu"] is None else f"{100 * c['mfu']:.1f}%"
            lines.append(f"| {c['name']} | {run['world_size']} | {1000 * c['step_time_median_s']:,.1f} ms "
                         f"({1000 * c['step_time_min_s']:,.1f}) | {c['tokens_per_sec_per_gpu']:,.0f} | "
                         f"{c['tflops_per_gpu']:,.2f} | {mfu} | {c['peak_memory_mb']:,.0f} ({c['memory_kind']}) |")
    return lines


def _options_line(run: dict) -> str:
    o = run["options"]
    switches = [name for name, on in (("bf16", o["bf16"]), ("grouped GEMM", o["moe_grouped_gemm"]),
                                      ("distributed optimizer", o["use_distributed_optimizer"]),
                                      ("overlapped gradient reduce", o["overlap_grad_reduce"]),
                                      ("overlapped parameter gather", o["overlap_param_gather"])) if on]
    return (f"{o['transformer_impl']} layers, {', '.join(switches) or 'fp32'}, {o['moe_token_dispatcher_type']} dispatcher; "
            f"sequence {o['seq_length']} x micro-batch {o['micro_batch_size']} x {o['micro_batches_per_step']} "
            f"micro-batches per step; median of {run['steps']} steps after {run['warmup']}"
            f"{', the configurations stepping in turn' if run.get('interleaved') else ''}")


def _spread(spread: Optional[List[float]]) -> str:
    return f" (median of per-round ratios; quartiles {spread[0]:.3f} to {spread[1]:.3f})" if spread else ""


def markdown(result: dict) -> str:
    verdict = {True: "passed", False: "FAILED", None: "not run"}[result["parity_ok"]]
    lines = [f"### Router Upcycling self-check, size {result['size']}: parity {verdict}", "",
             f"`{result['command']}` ({result['date']})", "", _device_line(result["device"], result["versions"]), ""]
    if result.get("parity"):
        lines += _parity_table(result["parity"]) + [""]
    calibration = result.get("calibration")
    if calibration:
        lines += [f"Calibration (average-key pass, float32): {calibration['tokens']:,} tokens in "
                  f"{calibration['seconds']:.2f} s = **{calibration['tokens_per_sec']:,.0f} tokens/s**; the paper's "
                  f"{calibration['paper_tokens']:,} tokens would take {calibration['paper_tokens_minutes']:,.1f} min.", ""]
    runs = result.get("throughput") or []
    if runs:
        lines += [f"Training steps ({result['model']}): {_options_line(runs[0])}.", ""]
        lines += _throughput_table(runs) + [""]
        lines += ["| figure | value | target (8x0.5B, H100) |", "|---|---|---|",
                  f"| tokens/s per GPU, MoR, {result['throughput_world_size']} rank(s) | "
                  f"**{_number(result['tokens_per_sec'])}** | >= {TARGETS['tokens_per_sec']:,} |",
                  f"| MFU, MoR | {_number(None if result['mfu'] is None else 100 * result['mfu'], 1, '%')} | |",
                  f"| MoR / linear step time{_spread(result['mor_over_linear_spread'])} | "
                  f"**{_number(result['mor_over_linear'], 3)}** | <= {TARGETS['mor_over_linear']} |",
                  f"| grouped GEMM off / on step time | {_number(result['grouped_gemm_off_over_on'], 3)} | |", ""]
    notes = sorted({note for run in runs for note in run["notes"]})
    if notes:
        lines += ["Notes: " + "; ".join(notes) + ".", ""]
    return "\n".join(lines)
