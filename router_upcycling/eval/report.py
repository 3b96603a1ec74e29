"""Scores in the paper's layout: group averages, reference numbers, markdown tables, results.json.

results.json schema::

    {"model": str,
     "tasks": {KEY: {"metric": str, "score": percent, "n": int, "all": {lm-eval metric: value}}},
     "groups": {"understanding" | "reasoning" | "knowledge" | "average": percent or null},
     "lm_eval_version": str,
     "settings": {...the run's options...}}

A group's score is the mean of the scores of its tasks that were run (null when none was);
"average" is the mean of every task that was run. With all ten tasks these are the paper's
Understanding, Reasoning, Knowledge and Average columns.
"""
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from router_upcycling.eval.tasks import GROUPS, SUITE, EvalError

GROUP_LABELS = {"understanding": "Understanding", "reasoning": "Reasoning", "knowledge": "Knowledge", "average": "Average"}

# Every run of the paper's Tables 1-4, keyed by its recipe's name (configs/paper/NAME.yaml): the ten task
# scores in SUITE order, as printed (every number is legible).
PAPER_RESULTS: Dict[str, Tuple[float, ...]] = {
    # Table 1: upcycling baselines, 8x0.5B (Qwen1.5-0.5B, 8 experts, top-2), 100B tokens
    "scratch": (31.4, 34.4, 27.12, 30.51, 41.45, 52.57, 48.13, 60.0, 4.32, 17.74),
    "vanilla": (40.8, 58.0, 39.66, 52.73, 49.36, 56.67, 49.88, 62.0, 4.85, 23.82),
    "switch": (27.6, 23.6, 14.58, 20.63, 25.24, 48.22, 47.09, 49.0, 0.42, 5.24),
    "locmoe": (38.2, 51.4, 29.15, 45.68, 48.83, 56.12, 54.19, 61.0, 4.04, 22.16),
    "mlp": (37.6, 55.0, 34.92, 51.15, 49.70, 58.88, 41.44, 63.0, 3.96, 24.17),
    "mor": (42.6, 59.0, 42.37, 58.02, 50.12, 56.91, 55.84, 64.0, 5.15, 24.25),
    # Table 2: a larger backbone (Qwen1.5-1.8B) and more experts (16)
    "8x1.8b-vanilla": (42.2, 59.6, 42.71, 58.73, 54.25, 59.12, 47.92, 68.0, 5.01, 28.29),
    "8x1.8b-mor": (47.4, 63.8, 44.07, 56.97, 57.95, 61.8, 43.94, 67.0, 6.59, 32.92),
    "16x0.5b-vanilla": (34.8, 50.8, 36.61, 55.56, 49.27, 56.67, 38.84, 58.0, 3.46, 23.82),
    "16x0.5b-mor": (37.0, 54.2, 40.00, 56.08, 50.00, 57.62, 41.01, 61.0, 3.66, 23.93),
    # Table 3: routers R (8 experts; K = max(R, 8) keys)
    "r2": (38.0, 57.8, 32.88, 45.21, 47.24, 57.62, 51.65, 68.0, 3.32, 18.78),
    "r4": (29.8, 40.8, 34.58, 40.92, 39.56, 55.56, 47.22, 63.0, 2.52, 13.45),
    "r16": (26.8, 27.6, 23.73, 23.81, 30.67, 52.49, 44.43, 59.0, 1.05, 9.39),
    "r32": (42.2, 52.6, 41.02, 51.15, 49.26, 58.48, 53.49, 64.0, 3.96, 22.8),
    # Table 4: max aggregation over the routers (summation is "mor")
    "max": (44.6, 56.4, 37.63, 54.14, 49.55, 58.17, 56.54, 63.0, 3.38, 22.62),
}

# The averages the paper prints: Table 1's group rows, the Average row of Tables 2-4. Each is the mean of the
# run's task scores above within 0.01, the paper having averaged unrounded scores
# (tests/eval/test_eval_paper_numbers.py); the averages it does not print are computed from the task scores.
PAPER_PRINTED_AVERAGES: Dict[str, Dict[str, float]] = {
    "scratch": {"understanding": 32.90, "reasoning": 37.91, "knowledge": 32.55, "average": 34.76},
    "vanilla": {"understanding": 49.40, "reasoning": 49.61, "knowledge": 35.14, "average": 43.78},
    "switch": {"understanding": 25.60, "reasoning": 27.17, "knowledge": 25.44, "average": 26.17},
    "locmoe": {"understanding": 44.80, "reasoning": 44.95, "knowledge": 35.35, "average": 41.08},
    "mlp": {"understanding": 46.30, "reasoning": 48.67, "knowledge": 33.14, "average": 41.98},
    "mor": {"understanding": 50.80, "reasoning": 51.86, "knowledge": 37.31, "average": 45.83},
    "8x1.8b-vanilla": {"average": 46.58}, "8x1.8b-mor": {"average": 48.24},
    "16x0.5b-vanilla": {"average": 40.78}, "16x0.5b-mor": {"average": 42.45},
    "r2": {"average": 42.05}, "r4": {"average": 36.74}, "r16": {"average": 29.90}, "r32": {"average": 43.90},
    "max": {"average": 44.60},
}

# The tables as the paper lays them out: (title, [(run, the paper's column header)]), columns in the paper's order.
PAPER_TABLES: Dict[int, Tuple[str, List[Tuple[str, str]]]] = {
    1: ("Upcycling baselines, 8x0.5B (Qwen1.5-0.5B, 8 experts, top-2)", [
        ("scratch", "Vanilla MoE from scratch"), ("vanilla", "Vanilla Upcycling"), ("switch", "Switch Upcycling"),
        ("locmoe", "LocMoE Upcycling"), ("mlp", "Upcycling w/ MLP routers"), ("mor", "Router Upcycling")]),
    2: ("Scaling up the backbone (Qwen1.5-1.8B) and the experts (16)", [
        ("vanilla", "8x0.5B Vanilla Upcycling"), ("mor", "8x0.5B Router Upcycling"),
        ("8x1.8b-vanilla", "8x1.8B Vanilla Upcycling"), ("8x1.8b-mor", "8x1.8B Router Upcycling"),
        ("16x0.5b-vanilla", "16x0.5B Vanilla Upcycling"), ("16x0.5b-mor", "16x0.5B Router Upcycling")]),
    3: ("Number of routers R and expert keys K, 8 experts", [
        ("vanilla", "Vanilla Upcycling"), ("r2", "R=2, K=8, d_r=512"), ("r4", "R=4, K=8, d_r=256"),
        ("mor", "R=N=8, K=8, d_r=128"), ("r16", "R=16, K=16, d_r=64"), ("r32", "R=32, K=32, d_r=32")]),
    4: ("Router mixture: max pooling vs summation", [("max", "Max Pooling"), ("mor", "Summation")]),
}

# The two 8x0.5B columns printed beside every evaluation (Table 1, method.md part 6).
PAPER_REFERENCE_RUNS = {"paper: vanilla upcycling": "vanilla", "paper: Router Upcycling": "mor"}


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def group_scores(task_scores: Dict[str, float]) -> Dict[str, Optional[float]]:
    """Understanding / Reasoning / Knowledge / Average over the tasks present in task_scores."""
    groups = {group: _mean([task_scores[t.key] for t in SUITE if t.group == group and t.key in task_scores]) for group in GROUPS}
    groups["average"] = _mean([task_scores[t.key] for t in SUITE if t.key in task_scores])
    return groups


def paper_reference_columns() -> List[Tuple[str, Dict[str, Optional[float]]]]:
    """The paper's two 8x0.5B rows as (name, {task key or group: score}) columns."""
    return [(name, paper_column(run)) for name, run in PAPER_REFERENCE_RUNS.items()]


def paper_column(run: str) -> Dict[str, Optional[float]]:
    """A run of the paper's tables as {task key or group: score}: its averages as printed where the paper prints them."""
    return {**score_column(PAPER_RESULTS[run]), **PAPER_PRINTED_AVERAGES[run]}


def score_column(scores: Sequence[float]) -> Dict[str, Optional[float]]:
    """Ten task scores in SUITE order as {task key or group: score}, with the group averages."""
    task_scores = {task.key: score for task, score in zip(SUITE, scores)}
    return {**task_scores, **group_scores(task_scores)}


def result_column(results: dict) -> Dict[str, Optional[float]]:
    """One results.json as {task key or group: score}."""
    return {**{key: entry["score"] for key, entry in results["tasks"].items()}, **results["groups"]}


def _cell(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown_table(columns: Sequence[Tuple[str, Dict[str, Optional[float]]]]) -> str:
    """Rows: the ten tasks in the paper's order, then the group averages; one column per model."""
    header = "| task | " + " | ".join(name for name, _ in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    rows = [header, rule]
    for key, label in [(t.key, t.label) for t in SUITE] + list(GROUP_LABELS.items()):
        cells = " | ".join(_cell(scores.get(key)) for _, scores in columns)
        label = f"**{label}**" if key in GROUP_LABELS else label
        rows.append(f"| {label} | {cells} |")
    return "\n".join(rows)


def load_results(path: str) -> dict:
    """Read and check a results.json written by `python -m router_upcycling.eval`."""
    file = Path(path)
    if not file.is_file():
        raise EvalError(f"results file not found: {path}")
    try:
        results = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise EvalError(f"{path} is not JSON: {err}") from None
    if not isinstance(results, dict) or not {"model", "tasks", "groups"} <= results.keys():
        raise EvalError(f"{path} is not a results.json of router_upcycling.eval (needs model, tasks, groups)")
    if not isinstance(results["model"], str):
        raise EvalError(f"{path}: 'model' must be the evaluated folder's path, got {results['model']!r}")
    tasks, groups = results["tasks"], results["groups"]
    if not isinstance(tasks, dict) or not all(isinstance(entry, dict) and _is_score(entry.get("score"))
                                              for entry in tasks.values()):
        raise EvalError(f"{path}: every entry of 'tasks' must be an object with a finite numeric 'score'")
    if not isinstance(groups, dict) or not all(value is None or _is_score(value) for value in groups.values()):
        raise EvalError(f"{path}: every value of 'groups' must be a finite number or null")
    return results


def _is_score(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
