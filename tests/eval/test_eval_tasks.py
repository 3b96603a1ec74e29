"""Task table, mirror layout and offline overrides (no model, no lm-eval run)."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from router_upcycling.eval.tasks import (
    SUITE,
    EvalError,
    all_mirror_files,
    check_mirror,
    offline_override,
    resolve_tasks,
    task_config,
)

REPO = Path(__file__).resolve().parents[2]

ZERO_SHOT_FILES = [
    "allenai/openbookqa/main/test.jsonl",
    "allenai/openbookqa/additional/test.jsonl",
    "allenai/ai2_arc/ARC-Challenge/test.jsonl",
    "allenai/ai2_arc/ARC-Easy/test.jsonl",
    "Rowan/hellaswag/default/validation.jsonl",
    "allenai/winogrande/winogrande_xl/validation.jsonl",
    "aps/super_glue/boolq/validation.jsonl",
    "aps/super_glue/copa/validation.jsonl",
    "google-research-datasets/nq_open/default/validation.jsonl",
    "mandarjoshi/trivia_qa/rc.nocontext/validation.jsonl",
]


def test_eval_suite_yamls_name_their_tasks():
    for task in SUITE:
        assert task.yaml_path.is_file(), task.yaml_path
        assert task_config(task)["task"] == task.lm_eval_task


def test_eval_zero_shot_mirror_layout_matches_the_documented_paths():
    files = all_mirror_files(SUITE, include_fewshot=False)
    assert [str(file.relative_path) for file in files] == ZERO_SHOT_FILES


def test_eval_fewshot_adds_each_task_training_split():
    files = {str(file.relative_path) for file in all_mirror_files(SUITE, include_fewshot=True)}
    expected_train = {str(Path(path).parent / "train.jsonl") for path in ZERO_SHOT_FILES}
    assert files == set(ZERO_SHOT_FILES) | expected_train


def test_eval_offline_override_reads_the_mirror_and_drops_unused_splits(tmp_path):
    obqa = resolve_tasks("obqa")[0]
    override = offline_override(obqa, tmp_path, num_fewshot=0)
    assert override["dataset_path"] == "json" and override["dataset_name"] is None
    assert override["dataset_kwargs"]["data_files"] == {"test": str((tmp_path / "allenai/openbookqa/main/test.jsonl").resolve())}
    assert override["training_split"] is None and override["validation_split"] is None
    assert "test_split" not in override  # the built-in value (test) stays
    assert Path(override["include"]).is_absolute()
    fewshot = offline_override(obqa, tmp_path, num_fewshot=2)
    assert set(fewshot["dataset_kwargs"]["data_files"]) == {"test", "train"}
    assert "training_split" not in fewshot


def test_eval_resolve_tasks_accepts_keys_and_lm_eval_names_in_paper_order():
    assert [task.key for task in resolve_tasks("paper")] == [task.key for task in SUITE]
    assert [task.key for task in resolve_tasks("triviaqa,openbookqa,obqa")] == ["obqa", "triviaqa"]
    with pytest.raises(EvalError, match="unknown task 'mmlu'"):
        resolve_tasks("obqa,mmlu")


def test_eval_check_mirror_names_the_missing_file(tmp_path):
    with pytest.raises(EvalError, match=str(tmp_path / "Rowan/hellaswag/default/validation.jsonl")):
        check_mirror(tmp_path, resolve_tasks("hellaswag"), num_fewshot=0)


def test_eval_obqa_fact_yaml_differs_from_openbookqa_only_in_data_and_prompt():
    obqa, fact = (task_config(task) for task in resolve_tasks("obqa,obqa_fact"))
    differing = {key for key in obqa.keys() | fact.keys() if obqa.get(key) != fact.get(key)}
    assert differing == {"task", "dataset_name", "doc_to_text"}
    assert fact["dataset_name"] == "additional" and fact["doc_to_text"].startswith("{{fact1}}")


def test_eval_shipped_task_yaml_is_valid_yaml():
    assert yaml.safe_load((REPO / "router_upcycling/eval/tasks/obqa_fact.yaml").read_text())["task"] == "obqa_fact"


def run_mirror_tool(*args):
    return subprocess.run([sys.executable, str(REPO / "tools/mirror_eval_data.py"), *args], capture_output=True, text=True)


def test_eval_mirror_tool_dry_run_lists_the_shared_layout(tmp_path):
    result = run_mirror_tool("--output", str(tmp_path / "mirror"), "--dry-run", "--eval-splits-only")
    assert result.returncode == 0, result.stderr
    assert [line.split(" -> ")[1] for line in result.stdout.splitlines()] == [str(tmp_path / "mirror" / path) for path in ZERO_SHOT_FILES]


def test_eval_mirror_tool_refuses_existing_output_and_unknown_task(tmp_path):
    existing = tmp_path / "mirror"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    result = run_mirror_tool("--output", str(existing))
    assert result.returncode != 0 and result.stderr.strip() == f"error: output {existing} exists; pass --force to replace it"
    assert (existing / "keep.txt").read_text() == "mine"
    result = run_mirror_tool("--output", str(tmp_path / "new"), "--tasks", "nope")
    assert result.returncode != 0 and result.stderr.startswith("error: unknown task 'nope'") and "Traceback" not in result.stderr
