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
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from router_upcycling.eval.tasks import GROUPS, SUITE, EvalError

GROUP_LABELS = {"understanding": "Understanding", "reasoning": "Reasoning", "knowledge": "Knowledge", "average": "Average"}

# Table 1 of the paper, 8x0.5B after 100B tokens, tasks in SUITE order (method.md part 6).
PAPER_SCORES = {
    "paper: vanilla upcycling": (40.8, 58.0, 39.66, 52.73, 49.36, 56.67, 49.88, 62.0, 4.85, 23.82),
    "paper: Router Upcycling": (42.6, 59.0, 42.37, 58.02, 50.12, 56.91, 55.84, 64.0, 5.15, 24.25),
}


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def group_scores(task_scores: Dict[str, float]) -> Dict[str, Optional[float]]:
    """Understanding / Reasoning / Knowledge / Average over the tasks present in task_scores."""
    groups = {group: _mean([task_scores[t.key] for t in SUITE if t.group == group and t.key in task_scores]) for group in GROUPS}
    groups["average"] = _mean([task_scores[t.key] for t in SUITE if t.key in task_scores])
    return groups


def paper_reference_columns() -> List[Tuple[str, Dict[str, Optional[float]]]]:
    """The paper's two 8x0.5B rows as (name, {task key or group: score}) columns."""
    columns = []
    for name, scores in PAPER_SCORES.items():
        task_scores = {task.key: score for task, score in zip(SUITE, scores)}
        columns.append((name, {**task_scores, **group_scores(task_scores)}))
    return columns


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
    return results
