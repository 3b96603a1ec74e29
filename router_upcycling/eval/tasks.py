"""The paper's ten evaluation tasks, where their data lives, and their offline overrides.

`SUITE` is the one list of tasks. Each task's data source (hub dataset path, config, splits) is
read from the task's own YAML (lm-eval's built-in one, or ours for OBQA-fact) rather than
restated here, so the offline mirror's layout, the mirror writer (tools/mirror_eval_data.py) and
the runner share one source of truth.

Mirror layout: `DIR/<hub dataset path>/<config or "default">/<split>.jsonl`, one hub row per line
in the hub dataset's own fields. Offline runs write, per task, a YAML that includes the task's
own YAML and overrides only where the data comes from (`dataset_path: json`, absolute
`data_files`) and which splits exist; prompts, filters and metrics stay lm-eval's.
"""
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

from router_upcycling.errors import UserError

OUR_TASKS_DIR = Path(__file__).resolve().parent / "tasks"
GROUPS = ("understanding", "reasoning", "knowledge")
SPLIT_KEYS = ("training_split", "validation_split", "test_split")


class EvalError(UserError):
    """A user error (bad model folder, task name, data mirror or output path): one line, no traceback."""


@dataclass(frozen=True)
class SuiteTask:
    """One task of the paper's table.

    key: the task's name in results.json and on the command line.
    label: its column header in the paper.
    group: understanding | reasoning | knowledge.
    lm_eval_task: the task's name inside lm-eval.
    builtin_yaml: its YAML relative to lm-eval's tasks folder; None for ours (OUR_TASKS_DIR).
    """

    key: str
    label: str
    group: str
    lm_eval_task: str
    builtin_yaml: Optional[str]

    @property
    def yaml_path(self) -> Path:
        if self.builtin_yaml is None:
            return OUR_TASKS_DIR / f"{self.lm_eval_task}.yaml"
        return lm_eval_tasks_dir() / self.builtin_yaml


SUITE = (
    SuiteTask("obqa", "OBQA", "understanding", "openbookqa", "openbookqa/openbookqa.yaml"),
    SuiteTask("obqa_fact", "OBQA-fact", "understanding", "obqa_fact", None),
    SuiteTask("arc_challenge", "ARC-C", "reasoning", "arc_challenge", "arc/arc_challenge.yaml"),
    SuiteTask("arc_easy", "ARC-E", "reasoning", "arc_easy", "arc/arc_easy.yaml"),
    SuiteTask("hellaswag", "HellaSwag", "reasoning", "hellaswag", "hellaswag/hellaswag.yaml"),
    SuiteTask("winogrande", "Winogrande", "reasoning", "winogrande", "winogrande/default.yaml"),
    SuiteTask("boolq", "BoolQ", "knowledge", "boolq", "super_glue/boolq/default.yaml"),
    SuiteTask("copa", "COPA", "knowledge", "copa", "super_glue/copa/default.yaml"),
    SuiteTask("nq_open", "NQ", "knowledge", "nq_open", "nq_open/nq_open.yaml"),
    SuiteTask("triviaqa", "TriviaQA", "knowledge", "triviaqa", "triviaqa/default.yaml"),
)
SUITE_BY_KEY = {task.key: task for task in SUITE}


def lm_eval_tasks_dir() -> Path:
    """lm-eval's built-in task folder, found without importing lm-eval."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise EvalError("lm-eval is not installed; install this package's `eval` extra")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def resolve_tasks(spec: str) -> List[SuiteTask]:
    """`paper` (all ten, in the paper's order) or a comma-separated list of task keys or lm-eval names."""
    if spec.strip() == "paper":
        return list(SUITE)
    by_name = {**{task.lm_eval_task: task for task in SUITE}, **SUITE_BY_KEY}
    chosen: List[SuiteTask] = []
    for name in filter(None, (part.strip() for part in spec.split(","))):
        if name not in by_name:
            raise EvalError(f"unknown task {name!r}; expected 'paper' or some of: {', '.join(SUITE_BY_KEY)}")
        if by_name[name] not in chosen:
            chosen.append(by_name[name])
    if not chosen:
        raise EvalError("no task given; use --tasks paper or a comma-separated list")
    return [task for task in SUITE if task in chosen]


@dataclass(frozen=True)
class MirrorFile:
    """One split of one hub dataset (config) in the offline mirror."""

    hub_path: str
    config: Optional[str]
    split: str

    @property
    def relative_path(self) -> Path:
        return Path(self.hub_path) / (self.config or "default") / f"{self.split}.jsonl"


def task_config(task: SuiteTask) -> dict:
    """The task's YAML with its includes merged (lm-eval's own loader; `!function` left unresolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(task.yaml_path, resolve_func=False, recursive=True)


def eval_split(config: dict) -> str:
    """The split lm-eval scores: the test split when the task has one, else the validation split."""
    return config.get("test_split") or config["validation_split"]


def fewshot_split(config: dict) -> str:
    """The split lm-eval draws few-shot examples from (its own precedence rule)."""
    explicit = (config.get("fewshot_config") or {}).get("split") or config.get("fewshot_split")
    return explicit or config.get("training_split") or config.get("validation_split") or config["test_split"]


def splits_used(config: dict, num_fewshot: int) -> List[str]:
    """Splits a run reads: the scored split, plus the few-shot split when num_fewshot > 0."""
    splits = [eval_split(config)]
    if num_fewshot > 0 and fewshot_split(config) not in splits:
        splits.append(fewshot_split(config))
    return splits


def mirror_files(task: SuiteTask, num_fewshot: int) -> List[MirrorFile]:
    """The mirror files a run of `task` with `num_fewshot` shots reads."""
    config = task_config(task)
    return [MirrorFile(config["dataset_path"], config.get("dataset_name"), split) for split in splits_used(config, num_fewshot)]


def all_mirror_files(tasks: Sequence[SuiteTask], include_fewshot: bool = True) -> List[MirrorFile]:
    """Every distinct mirror file the tasks read, zero-shot and (include_fewshot) few-shot."""
    files: List[MirrorFile] = []
    for task in tasks:
        for file in mirror_files(task, num_fewshot=1 if include_fewshot else 0):
            if file not in files:
                files.append(file)
    return files


def check_mirror(data_dir: Path, tasks: Sequence[SuiteTask], num_fewshot: int) -> None:
    """Fail with the expected path of the first missing mirror file (lm-eval would skip the task silently)."""
    for task in tasks:
        for file in mirror_files(task, num_fewshot):
            path = data_dir / file.relative_path
            if not path.is_file():
                raise EvalError(f"missing mirror file for task {task.key}: expected {path} (write the mirror with tools/mirror_eval_data.py)")
            check_json_lines(path)


def check_json_lines(path: Path) -> None:
    """Every line of a mirror file is a JSON object (lm-eval would otherwise fail deep inside `datasets`)."""
    import json

    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            try:
                row = json.loads(line) if line.strip() else {}
            except json.JSONDecodeError as err:
                raise EvalError(f"{path}:{number} is damaged (not JSON: {err}); write the mirror again") from None
            if not isinstance(row, dict):
                raise EvalError(f"{path}:{number} is not a JSON object; write the mirror again")


def check_hub_reachable(what: str, timeout: float = 5.0, hint: Optional[str] = None) -> None:
    """Fail at once, in one line, where the Hugging Face hub cannot be reached (lm-eval and datasets would retry for
    minutes, then end in a ConnectionError traceback); the line ends with `hint` (default: evaluate offline)."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise EvalError(f"{what} needs the Hugging Face hub, and HF_HUB_OFFLINE is set; {hint or OFFLINE_HINT}")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    host, _, port = endpoint.partition(":")
    try:
        socket.create_connection((host, int(port or 443)), timeout=timeout).close()
    except OSError as err:
        raise EvalError(f"{what} needs the Hugging Face hub, and {host} cannot be reached ({err}); {hint or OFFLINE_HINT}") from None


OFFLINE_HINT = ("evaluate offline with --data-dir DIR, a mirror written where the hub is reachable "
                "(tools/mirror_eval_data.py)")


def offline_override(task: SuiteTask, data_dir: Path, num_fewshot: int) -> dict:
    """A task YAML (as a dict) that reuses `task` but reads its splits from the mirror.

    Split keys whose split the run does not read are set to null, because lm-eval loads the few-shot
    split while building the task even at zero shots.
    """
    config = task_config(task)
    used = splits_used(config, num_fewshot)
    data_files: Dict[str, str] = {}
    for file in mirror_files(task, num_fewshot):
        data_files[file.split] = str((data_dir / file.relative_path).resolve())
    override = {
        "task": task.lm_eval_task,
        "include": str(task.yaml_path),
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": data_files},
    }
    for key in SPLIT_KEYS:
        if config.get(key) and config[key] not in used:
            override[key] = None
    return override


def write_offline_overrides(tasks: Sequence[SuiteTask], data_dir: Path, num_fewshot: int, output_dir: Path) -> None:
    """Write one override YAML per task into output_dir (an lm-eval include path)."""
    check_mirror(data_dir, tasks, num_fewshot)
    for task in tasks:
        text = yaml.safe_dump(offline_override(task, data_dir, num_fewshot), sort_keys=False)
        (output_dir / f"{task.key}.yaml").write_text(text)
