"""The paper's Tables 1-4 from the matrix's runs, beside the paper's numbers, and their loss curves.

Reads ROOT/NAME/results.json (router_upcycling.eval), ROOT/NAME/train/metrics.jsonl (training) and
ROOT/NAME/recipe.yaml (the settings tools/paper_matrix.py recorded). A run without results is an empty row.
"""
from pathlib import Path
from typing import Dict, List, Optional

import yaml

from router_upcycling.errors import UserError
from router_upcycling.eval.report import GROUP_LABELS, PAPER_TABLES, load_results, paper_column, result_column
from router_upcycling.eval.tasks import SUITE, EvalError
from router_upcycling.paper.matrix import RunLayout
from router_upcycling.train.metrics import read_metrics

COLUMNS = [(task.key, task.label) for task in SUITE] + list(GROUP_LABELS.items())


def format_tokens(tokens: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if tokens >= size:
            return f"{tokens / size:.1f}{unit}"
    return str(int(tokens))


def cell(ours: Optional[float], paper: Optional[float]) -> str:
    """`ours / paper (ours - paper)`, `- / paper` when the run has no score yet."""
    if ours is None:
        return f"- / {paper:.2f}"
    return f"{ours:.2f} / {paper:.2f} ({ours - paper:+.2f})"


def run_settings(layout: RunLayout) -> Optional[dict]:
    """The recipe a run was started with (recipe.yaml), None before it was submitted."""
    return yaml.safe_load(layout.recipe.read_text())["recipe"] if layout.recipe.is_file() else None


def tokens_per_step(layout: RunLayout) -> Optional[int]:
    settings = run_settings(layout)
    if settings is None:
        return None
    return int(settings["train"]["global-batch-size"]) * int(settings["train"]["seq-length"])


def trained_on(layout: RunLayout, results: Optional[dict]) -> str:
    """What our row rests on: the steps and tokens trained, and the rows scored per task when limited."""
    settings = run_settings(layout)
    if settings is None:
        return "-"
    steps = int(settings["train"]["train-iters"])
    text = f"{steps:,} steps, {format_tokens(steps * tokens_per_step(layout))} tokens"
    limit = (results or {}).get("settings", {}).get("limit")
    return text + (f"; {limit} rows/task" if limit else "")


def read_results(layout: RunLayout) -> Optional[dict]:
    """The run's results.json, None before its eval has run."""
    if not layout.results.is_file():
        return None
    try:
        return load_results(str(layout.results))
    except EvalError as err:  # the eval's own error type is not a UserError
        raise UserError(str(err)) from None


def table_markdown(number: int, root: str) -> str:
    """Table NUMBER: one row per run, each cell ours / paper (difference); the runs' training and eval sizes last."""
    title, runs = PAPER_TABLES[number]
    header = "| run | " + " | ".join(label for _, label in COLUMNS) + " | ours: trained on |"
    lines = [f"## Table {number}: {title}", "", header, "|---|" + "---:|" * len(COLUMNS) + "---|"]
    for run, label in runs:
        layout = RunLayout(root, run)
        results = read_results(layout)
        ours = result_column(results) if results else {}
        paper = paper_column(run)
        cells = " | ".join(cell(ours.get(key), paper[key]) for key, _ in COLUMNS)
        lines.append(f"| {label} (`{run}`) | {cells} | {trained_on(layout, results)} |")
    return "\n".join(lines)


def loss_curves(runs: List[str], root: str) -> Dict[str, tuple]:
    """{run: (tokens -> training loss, tokens -> validation loss)} of the runs that have metrics."""
    curves = {}
    for run in runs:
        layout = RunLayout(root, run)
        per_step = tokens_per_step(layout)
        if per_step is None or not layout.metrics.is_file():
            continue
        train, valid = read_metrics(str(layout.metrics))
        curves[run] = ({step * per_step: loss for step, loss in train.items()},
                       {step * per_step: loss for step, loss in valid.items()})
    return curves


def plot_loss_curves(curves: Dict[str, tuple], labels: Dict[str, str], title: str, path: str) -> None:
    """Training loss (left) and validation loss (right) against training tokens, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (train_axes, valid_axes) = plt.subplots(1, 2, figsize=(12, 4.2))
    for run, (train, valid) in curves.items():
        train_axes.plot(list(train), list(train.values()), label=labels[run])
        valid_axes.plot(list(valid), list(valid.values()), "o-", label=labels[run])
    for axes, name in ((train_axes, "training"), (valid_axes, "validation")):
        axes.set_xlabel("training tokens")
        axes.set_ylabel(f"{name} LM loss (nats/token)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_tables(root: str, output_dir: str) -> List[str]:
    """tables.md (Tables 1-4) and tableN_loss.png (runs with metrics) into output_dir; returns the files written."""
    output = Path(output_dir)
    sections = [
        "# The paper's Tables 1-4, reproduced",
        "",
        f"Runs under `{root}`. Each cell: ours / the paper's (ours - paper), scores in %; `-`: the run has no "
        "results.json yet. The paper's runs each trained 25,600 steps of 1024 x 4096 tokens (100B); ours on what the "
        "last column says. The paper's averages are as it prints them (Table 1: every group; Tables 2-4: the "
        "Average), the others computed from its task scores. Loss curves (the paper's Figures 3-4 plot scores and loss against tokens; "
        "here loss, from each run's metrics.jsonl): one PNG per table.",
    ]
    written = []
    for number, (title, runs) in PAPER_TABLES.items():
        sections += ["", table_markdown(number, root), ""]
        curves = loss_curves([run for run, _ in runs], root)
        if curves:
            name = f"table{number}_loss.png"
            plot_loss_curves(curves, {run: f"{label} ({run})" for run, label in runs}, f"Table {number}: {title}", str(output / name))
            sections.append(f"![Table {number}: loss against training tokens]({name})")
            written.append(name)
        else:
            sections.append("No run of this table has training metrics yet.")
    (output / "tables.md").write_text("\n".join(sections) + "\n")
    return ["tables.md", *written]
