"""Figures of the analyses (matplotlib, Agg backend): routing heatmap, similarity curve, load heatmap, health bars."""
import math
from typing import List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def _heatmap(values: Sequence[Sequence[float]], row_labels: List[str], title: str, ylabel: str, path: str) -> None:
    """Rows x experts heatmap with each cell's value written in it."""
    num_rows, num_experts = len(values), len(values[0])
    figure, axes = plt.subplots(figsize=(1.0 + 0.8 * num_experts, 1.2 + 0.5 * num_rows))
    image = axes.imshow(values, cmap="viridis", aspect="auto")
    middle = (min(map(min, values)) + max(map(max, values))) / 2
    for row in range(num_rows):
        for expert in range(num_experts):
            value = values[row][expert]
            color = "black" if value > middle else "white"  # readable on viridis' light and dark ends
            axes.text(expert, row, f"{value:.2f}", ha="center", va="center", color=color, fontsize=7)
    axes.set_xticks(range(num_experts), [str(e) for e in range(num_experts)])
    axes.set_yticks(range(num_rows), row_labels)
    axes.set_xlabel("expert")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_routing(result: dict, path: str) -> None:
    names = list(result["domains"])
    weights = [result["domains"][name]["weights"] for name in names]
    _heatmap(weights, names, f"average routing weight, layer {result['layer']}", "domain", path)


def plot_load(result: dict, path: str) -> None:
    _heatmap(result["share"], [str(layer) for layer in result["layers"]], "share of routed tokens per expert", "layer", path)


def plot_specialization(result: dict, path: str) -> None:
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(result["layers"], result["mean_cosine_similarity"], marker="o")
    axes.set_xlabel("layer")
    axes.set_ylabel("mean cosine similarity of expert outputs")
    axes.set_title("expert specialisation (lower = more specialised)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_health(result: dict, path: str) -> None:
    """One bar panel per health number, layers on the x axis, dashed lines at the balanced / even values."""
    layers, health = result["layers"], result["routing_health"]
    num_experts, topk = result["num_experts"], result["topk"]
    panels = [
        ("max_share", "largest expert share", [(1 / num_experts, "1/N")], 1.0),
        ("dead_experts", "dead experts (< 10% of 1/N)", [], num_experts),
        ("top1_weight", "weight of the first expert", [(1 / topk, "1/k")], 1.0),
        ("logit_std", "std of router logits", [], None),
        ("entropy", "entropy of mean routing (nats)", [(math.log(num_experts), "ln N")], None),
        ("tied_choice", "tokens choosing tied experts", [], 1.0),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    for ax, (key, title, references, top) in zip(axes, panels):
        ax.bar(layers, [layer[key] for layer in health], color="tab:blue")
        for value, label in references:
            ax.axhline(value, color="gray", linestyle="--", linewidth=1, label=label)
        if references:
            ax.legend(fontsize=7, loc="best")
        if top is not None:
            ax.set_ylim(0, top * 1.05)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer")
    figure.suptitle(f"routing health over {result['tokens']:,} tokens")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
