"""Plots and the Markdown report of the quickstart: loss curves from the runs' metrics.jsonl, the routing
heatmaps written by `python -m router_upcycling.analyze routing`, and the evaluation table.
"""
import json
import math
import os
import statistics
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from examples.quickstart.corpus import VALID_PERCENT  # noqa: E402
from router_upcycling.routing_stats import DEAD_FRACTION  # noqa: E402
from router_upcycling.train.metrics import read_metrics  # noqa: E402

RUN_LABELS = {"vanilla": "vanilla upcycling (linear router)", "mor": "Router Upcycling (MoR)"}
RUN_COLORS = {"vanilla": "tab:blue", "mor": "tab:red"}


def smoothed(values: Sequence[float], window: int) -> List[float]:
    """Trailing mean over up to `window` logged values: the trend under the batch-to-batch noise (each small batch
    holds a different mix of easy math and hard prose)."""
    return [statistics.mean(values[max(0, i + 1 - window):i + 1]) for i in range(len(values))]


def smoothing_window(num_points: int) -> int:
    return max(1, num_points // 10)


def plot_loss_curves(metrics_files: Dict[str, str], path: str, title: str) -> None:
    """Training loss (raw: faint; smoothed: solid) and validation loss (markers) of every run on one chart."""
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for name, metrics_file in metrics_files.items():
        train, valid = read_metrics(metrics_file)
        label, color = RUN_LABELS.get(name, name), RUN_COLORS.get(name)
        window = smoothing_window(len(train))
        ax.plot(list(train), list(train.values()), color=color, alpha=0.25, linewidth=0.8)
        ax.plot(list(train), smoothed(list(train.values()), window), color=color,
                label=f"{label}: train, trailing mean of {window}")
        ax.plot(list(valid), list(valid.values()), "o--", color=color, label=f"{label}: validation")
    _save_loss_plot(fig, ax, path, "LM loss (nats/token)", title)


def plot_seed_bands(curves: Dict[str, List[Dict[int, float]]], path: str, title: str) -> None:
    """Mean training loss over seeds per run, with a band of +- one standard deviation."""
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for name, per_seed in curves.items():
        steps = sorted(set.intersection(*(set(c) for c in per_seed)))
        means = [statistics.mean(c[s] for c in per_seed) for s in steps]
        stds = [statistics.stdev(c[s] for c in per_seed) if len(per_seed) > 1 else 0.0 for s in steps]
        ax.plot(steps, means, color=RUN_COLORS.get(name), label=f"{RUN_LABELS.get(name, name)} ({len(per_seed)} seeds)")
        ax.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                        color=RUN_COLORS.get(name), alpha=0.2)
    _save_loss_plot(fig, ax, path, "training LM loss (nats/token)", title)


def _save_loss_plot(fig, ax, path: str, ylabel: str, title: str) -> None:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)  # beside the data, not on it
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def weight_text(weight: float) -> str:
    """A routing weight as the table and the heatmap both print it."""
    return f"{weight:.2f}"


def dead_experts(domains: Dict[str, dict]) -> List[int]:
    """Experts whose average routing weight is under DEAD_FRACTION of a fair share in every domain (the definition
    of `dead_experts` in router_upcycling/routing_stats.py, on weights instead of token shares)."""
    num_experts = len(next(iter(domains.values()))["weights"])
    return [expert for expert in range(num_experts)
            if all(entry["weights"][expert] < DEAD_FRACTION * sum(entry["weights"]) / num_experts
                   for entry in domains.values())]


def plot_routing_pair(routing_jsons: Dict[str, str], models: Dict[str, str], path: str) -> None:
    """The runs' routing heatmaps side by side on one colour scale (so equal colours are equal weights), one labelled
    colour bar, each titled with its run and model folder; dead experts are crossed out and named on the axis."""
    from matplotlib.patches import Rectangle

    results = {}
    for name, routing_json in routing_jsons.items():
        with open(routing_json) as f:
            results[name] = json.load(f)
    highest = max(w for result in results.values() for entry in result["domains"].values() for w in entry["weights"])
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results) + 1.2, 3.2), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        domains = list(result["domains"])
        weights = [result["domains"][d]["weights"] for d in domains]
        dead = dead_experts(result["domains"])
        image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=highest, aspect="auto")
        for row, values in enumerate(weights):
            for expert, value in enumerate(values):
                color = "black" if value > highest / 2 else "white"  # readable on viridis' light and dark ends
                ax.text(expert, row, weight_text(value), ha="center", va="center", color=color, fontsize=7)
        for expert in dead:
            ax.add_patch(Rectangle((expert - 0.5, -0.5), 1, len(domains), fill=False, edgecolor="tab:red",
                                   hatch="xx", linewidth=1.2))
        ax.set_xticks(range(len(weights[0])), [f"{e}\ndead" if e in dead else str(e) for e in range(len(weights[0]))])
        for label, expert in zip(ax.get_xticklabels(), range(len(weights[0]))):
            if expert in dead:
                label.set_color("tab:red")
        ax.set_yticks(range(len(domains)), domains)
        ax.set_xlabel("expert")
        ax.set_title(f"{RUN_LABELS.get(name, name)}\n{models.get(name, '')}, layer {result['layer']}", fontsize=9)
    bar = fig.colorbar(image, ax=list(axes[0]), fraction=0.03, pad=0.02)
    bar.set_label("average routing weight per token")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def routing_entropy_bits(weights: Sequence[float]) -> float:
    """Entropy of a domain's average routing weights over experts (3 bits = uniform over 8; lower = more uneven)."""
    total = sum(weights)
    return -sum(w / total * math.log2(w / total) for w in weights if w > 0)


def routing_summary(routing_json: str) -> Dict[str, dict]:
    """{"domains": {domain: {entropy_bits, top_expert, top_weight}}, "dead_experts": [...]} from a routing.json of
    the analysis tool; numbers unrounded (rounded once, where they are printed)."""
    with open(routing_json) as f:
        domains = json.load(f)["domains"]
    summary = {}
    for domain, entry in domains.items():
        weights = entry["weights"]
        top = max(range(len(weights)), key=weights.__getitem__)
        summary[domain] = {"entropy_bits": routing_entropy_bits(weights), "top_expert": top, "top_weight": weights[top]}
    return {"domains": summary, "dead_experts": dead_experts(domains)}


def window_mean(curve: Dict[int, float], last_step: int, window: int) -> float:
    """Mean logged training loss over the steps (last_step - window, last_step]."""
    values = [loss for step, loss in curve.items() if last_step - window < step <= last_step]
    return statistics.mean(values)


def mean_std(values: Sequence[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def evaluation_table(evaluation: Dict[str, Dict[str, dict]]) -> str:
    """One row per model: held-out loss / perplexity / accuracy per domain, and their means."""
    domains = list(next(iter(evaluation.values())))
    header = ["model"] + [f"{d} loss / ppl / acc" for d in domains] + ["mean loss", "mean acc"]
    rows = []
    for model, results in evaluation.items():
        cells = [f"{results[d]['loss']:.3f} / {results[d]['perplexity']:.1f} / {100 * results[d]['accuracy']:.1f}%" for d in domains]
        mean_loss = statistics.mean(results[d]["loss"] for d in domains)
        mean_acc = statistics.mean(results[d]["accuracy"] for d in domains)
        rows.append([RUN_LABELS.get(model, model), *cells, f"{mean_loss:.3f}", f"{100 * mean_acc:.1f}%"])
    return markdown_table(header, rows)


def training_table(metrics_files: Dict[str, str]) -> str:
    rows = []
    for name, path in metrics_files.items():
        train, valid = read_metrics(path)
        first_val = min(valid) if valid else None
        last_val = max(valid) if valid else None
        rows.append([RUN_LABELS.get(name, name), f"{train[min(train)]:.4f}", f"{train[max(train)]:.4f}",
                     f"{valid[first_val]:.4f} (step {first_val})" if valid else "-",
                     f"{valid[last_val]:.4f} (step {last_val})" if valid else "-"])
    return markdown_table(["run", "first logged train loss", "last logged train loss", "first val loss", "final val loss"], rows)


def routing_table(routing: Dict[str, dict]) -> str:
    rows = []
    for name, summary in routing.items():
        cells = [f"{s['entropy_bits']:.2f} bits (expert {s['top_expert']}: {weight_text(s['top_weight'])})"
                 for s in summary["domains"].values()]
        dead = ", ".join(map(str, summary["dead_experts"])) or "none"
        rows.append([RUN_LABELS.get(name, name), *cells, dead])
    header = (["run"] + [f"{domain}: entropy (top expert: weight)" for domain in next(iter(routing.values()))["domains"]]
              + [f"dead experts (under {DEAD_FRACTION:.0%} of a fair share in every domain)"])
    return markdown_table(header, rows)


def timings_table(timings: Dict[str, float]) -> str:
    rows = [[stage, f"{seconds:.1f}"] for stage, seconds in timings.items()]
    rows.append(["**total**", f"**{sum(timings.values()):.1f}**"])
    return markdown_table(["stage", "seconds"], rows)


def write_report(path: str, sections: Dict[str, str]) -> None:
    """Write the Markdown file: a title, then each section as '## name' and its body."""
    parts = ["# Router Upcycling quickstart report\n"]
    parts += [f"## {name}\n\n{body.strip()}\n" for name, body in sections.items()]
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(parts))
    os.replace(path + ".tmp", path)


def seeds_summary(curves: Dict[str, List[Dict[int, float]]], finals: Dict[str, List[float]], train_iters: int,
                  window: int, checkpoints: Optional[Sequence[int]] = None) -> str:
    """A Markdown table: mean ± std over seeds of the windowed training loss at a few steps, and of the final val loss."""
    checkpoints = checkpoints or [train_iters // 4, train_iters // 2, 3 * train_iters // 4, train_iters]
    header = ["run"] + [f"train loss, steps {max(0, s - window)}-{s}" for s in checkpoints] + ["final val loss"]
    rows = []
    for name, per_seed in curves.items():
        cells = [mean_std([window_mean(c, s, window) for c in per_seed]) for s in checkpoints]
        rows.append([RUN_LABELS.get(name, name), *cells, mean_std(finals[name])])
    names = list(curves)
    if len(names) == 2 and all(len(curves[n]) > 1 for n in names):
        differences = []
        for s in checkpoints:
            paired = [window_mean(a, s, window) - window_mean(b, s, window) for a, b in zip(curves[names[1]], curves[names[0]])]
            differences.append(mean_std(paired))
        paired_final = [a - b for a, b in zip(finals[names[1]], finals[names[0]])]
        rows.append([f"difference {names[1]} - {names[0]} (paired by seed)", *differences, mean_std(paired_final)])
    return markdown_table(header, rows)


def split_mix(train_jsonl: str, valid_percent: float) -> Dict[str, Dict[str, float]]:
    """{"train"|"validation": {domain: share of characters}} of the training file cut as training's --split cuts it:
    by document count, the validation split being the documents after the first (100 - valid_percent)%."""
    with open(train_jsonl, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    cut = int(round((100 - valid_percent) / 100 * len(rows)))
    mix = {}
    for part, part_rows in (("train", rows[:cut]), ("validation", rows[cut:])):
        chars: Dict[str, int] = {}
        for row in part_rows:
            chars[row["domain"]] = chars.get(row["domain"], 0) + len(row["text"])
        mix[part] = {domain: count / max(1, sum(chars.values())) for domain, count in sorted(chars.items())}
    return mix


def validation_note(mix: Dict[str, Dict[str, float]], valid_percent: float, global_batch_size: int) -> str:
    """Why the validation loss can be read against the training loss, and what it does not measure."""
    shares = {part: ", ".join(f"{domain} {share:.0%}" for domain, share in domains.items()) for part, domains in mix.items()}
    return (f"Validation is the last {valid_percent:g}% of the training file's documents (`--split "
            f"{100 - valid_percent:g},{valid_percent:g},0`, which megatron-core cuts by document count). The corpus "
            "interleaves the domains by characters, so that tail holds them as training does (characters: validation "
            f"{shares['validation']}; training {shares['train']}). With a plain shuffle it did not: in the demo's sizes its "
            "136 documents came out 72% math tokens against 57% in training (math documents are ~110 characters, code "
            "ones ~1,500, so a few documents swing the mix), and math is by far the easiest domain (the dense model's "
            "loss: ~1.3 nats on math, ~4.4-5.5 on code and prose), which put the validation loss about 0.5 nats below "
            "the training loss (dense model: 2.34 against 2.90) without any model being better on it. What is left: a "
            f"logged training loss is the mean over its step's batch of {global_batch_size} sequences, measured before that step's "
            "update, so the raw curve (faint) swings with each batch's domain mix; the solid line is its trailing "
            "mean. The validation documents were also in the dense model's pretraining text, as were the training "
            "ones: validation follows the continued training, not generalisation to unseen text, which the "
            "held-out evaluation below measures.")


def corpus_section(stats: dict) -> str:
    rows = [[domain, c["train_documents"], f"{c['train_chars']:,}", c["heldout_documents"], f"{c['heldout_chars']:,}"]
            for domain, c in stats["domains"].items()]
    return ("Built from text every Python installation has (`examples/quickstart/corpus.py`): **code** = the standard "
            "library's source, one document per top-level function or class, docstrings removed; **prose** = the "
            "standard library's docstrings of at least 200 characters (read with `ast`); **math** = generated "
            "arithmetic, 4-12 correct equations per document. Files are listed sorted, shuffled with a fixed seed "
            f"and read until each domain's budget is met; the last documents of each domain are held out for the "
            f"evaluation and the routing analysis. Standard library: `{stats['stdlib']}`.\n\n"
            + markdown_table(["domain", "train documents", "train characters", "held-out documents", "held-out characters"], rows))


def calibration_text(calibration: dict) -> str:
    """The calibration tokens the checkpoint records as used, and the count asked for when the text ran out first."""
    text = f"{calibration['tokens']:,} calibration tokens"
    requested = calibration.get("requested_tokens", calibration["tokens"])
    return text if requested == calibration["tokens"] else f"{text} ({requested:,} asked for: the training text ran out)"


def models_section(dense: dict, settings, pretrain_loss: float, calibration: dict) -> str:
    return (f"- dense: Qwen2ForCausalLM, hidden {dense['hidden_size']}, {dense['num_layers']} layers, {dense['num_heads']} "
            f"heads, FFN {dense['intermediate_size']}, tied embeddings, byte-level BPE vocabulary {dense['vocab_size']}; "
            f"trained from scratch for {dense['steps']} steps of {dense['batch_size']} x {dense['seq_length']} tokens "
            f"(AdamW, peak lr {dense['lr']}, cosine), last training loss {pretrain_loss:.3f}.\n"
            f"- upcycled twice to {settings.num_experts} experts, top-{settings.topk} (`tools/convert_checkpoint.py upcycle "
            f"--dtype fp32`): **vanilla** = random linear router (`--router linear`); **Router Upcycling** = "
            f"{settings.num_experts} routers initialised from the attention heads' queries and the average keys of "
            f"{calibration_text(calibration)} (`--router mor`).\n"
            f"- continued training (`python -m router_upcycling.train`, {settings.nproc} ranks): {settings.train_iters} "
            f"steps of {settings.global_batch_size} x {dense['seq_length']} tokens, lr {settings.lr} (warmup "
            f"{settings.lr_warmup_iters}, then the step schedule), same data order and seed for both runs; validation "
            f"loss every {settings.eval_interval} steps on the same {settings.eval_iters} held-out batches.")


def seeds_section(layout, settings, seeds: Sequence[int]) -> str:
    """Mean ± std over seeds (training loss in windows and final validation loss); writes seeds.png and seeds.json."""
    curves, finals = {}, {}
    for name in RUN_LABELS:
        runs = [read_metrics(str(layout.trained(name, seed) / "metrics.jsonl")) for seed in seeds]
        curves[name] = [train for train, _ in runs]
        finals[name] = [valid[max(valid)] for _, valid in runs]
    window = max(settings.log_interval, settings.train_iters // 10)
    plot_seed_bands(curves, str(layout.root / "seeds.png"), f"continued training, {len(seeds)} seeds (mean ± std)")
    with open(layout.root / "seeds.json", "w") as f:
        json.dump({"seeds": list(seeds), "train_loss": {n: [{str(k): v for k, v in c.items()} for c in curves[n]] for n in curves},
                   "final_val_loss": finals}, f, indent=1)
    return (f"Seeds {', '.join(map(str, seeds))}: each seed draws the vanilla router and the data order of both runs "
            f"(the dense model and the Mixture-of-Routers init are shared). Training loss is the mean of the logged "
            f"losses in a window of {window} steps.\n\n" + seeds_summary(curves, finals, settings.train_iters, window)
            + "\n\n![training loss over seeds](seeds.png)")


def write_quickstart_report(layout, settings, seeds: Sequence[int], timings: Dict[str, float], commands: Dict[str, str]) -> None:
    """OUTPUT/report.md and its plots, from the files the pipeline's stages wrote (layout: run.Layout)."""
    main_seed = seeds[0]
    metrics = {name: str(layout.trained(name, main_seed) / "metrics.jsonl") for name in RUN_LABELS}
    plot_loss_curves(metrics, str(layout.root / "loss_curves.png"), f"continued training after upcycling (seed {main_seed})")
    evaluation = json.loads(layout.evaluation.read_text())
    routing_jsons = {name: str(layout.routing(name) / "routing.json") for name in RUN_LABELS}
    routing = {name: routing_summary(path) for name, path in routing_jsons.items()}
    plot_routing_pair(routing_jsons, {name: os.path.relpath(layout.exported(name), layout.root) for name in RUN_LABELS},
                      str(layout.root / "routing.png"))
    dense = json.loads((layout.dense / "pretrain_settings.json").read_text())
    calibration = json.loads((layout.upcycled("mor", main_seed) / "router_upcycling.json").read_text())["calibration"]
    pretrain_log = [json.loads(line) for line in (layout.dense / "pretrain_log.jsonl").read_text().splitlines()]
    finals = {name: read_metrics(path)[1] for name, path in metrics.items()}
    final_val = {name: valid[max(valid)] for name, valid in finals.items() if valid}
    verify = "\n".join(f"- `{name}`: {layout.verify_log(name, main_seed).read_text().strip().splitlines()[-1]}" for name in RUN_LABELS)
    summary = ("Both MoE models start from the same dense model and compute exactly its function at step 0 (verified "
               "below); they differ only in the router.")
    if len(final_val) == 2:
        summary += (f" After {settings.train_iters} steps the validation loss is {final_val['mor']:.4f} with Router "
                    f"Upcycling and {final_val['vanilla']:.4f} with vanilla upcycling (difference "
                    f"{final_val['mor'] - final_val['vanilla']:+.4f}). One seed cannot separate a difference this size "
                    "from noise: run with `--seeds 1 2 3` (see the seeds section when present, and docs/results.md).")
    sections = {
        "Summary": summary,
        "Corpus": corpus_section(json.loads((layout.corpus / "stats.json").read_text())),
        "Models": models_section(dense, settings, pretrain_log[-1]["loss"], calibration),
        "Upcycling check (`convert_checkpoint.py verify`)": verify,
        "Continued training": (training_table(metrics) + "\n\n![loss curves](loss_curves.png)\n\n"
                               + validation_note(split_mix(str(layout.train_jsonl), VALID_PERCENT), VALID_PERCENT,
                                                 settings.global_batch_size)),
        "Held-out evaluation": ("Next-token loss (nats/token), perplexity and accuracy on the held-out documents of each "
                                f"domain, sequences of {settings.dense.seq_length} tokens, up to {settings.eval_tokens:,} "
                                "tokens per domain (`examples/quickstart/evaluate.py`).\n\n" + evaluation_table(evaluation)),
        "Routing diversity (`python -m router_upcycling.analyze routing`)": (
            "Average routing weight of each expert per domain at the last layer (the paper's Figure 5). Entropy of each "
            "domain's average weights: 3 bits = uniform over 8 experts; lower = more uneven routing. A dead expert "
            f"gets under {DEAD_FRACTION:.0%} of a fair share of the weight in every domain (crossed out in red on the "
            "heatmaps, which share one colour scale). Each analysis's own plot: `routing/<run>/routing.png`.\n\n"
            + routing_table(routing) + "\n\n![routing of both runs](routing.png)"),
    }
    if len(seeds) > 1:
        sections["Seeds"] = seeds_section(layout, settings, seeds)
    sections["Time per stage"] = "Seconds each stage took when it last ran (a resumed run keeps the earlier times).\n\n" + timings_table(timings)
    sections["Commands"] = "The sub-tools the pipeline ran, from the repository root:\n\n```\n" + "\n".join(commands.values()) + "\n```"
    write_report(str(layout.report), sections)
