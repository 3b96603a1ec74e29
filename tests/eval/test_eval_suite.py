"""The suite end to end with real lm-eval on tiny local models and a made-up offline mirror."""
import json
import subprocess
import sys
from statistics import mean

import pytest

from router_upcycling.eval.report import PAPER_REFERENCE_RUNS
from router_upcycling.eval.runner import EvalSettings, run_suite
from router_upcycling.eval.sample_data import write_sample_mirror
from router_upcycling.eval.tasks import SUITE, resolve_tasks
from router_upcycling.testing import make_dense_qwen2, make_tiny_qwen2_moe

ROWS = 10
LIMIT = 6


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_suite")
    write_sample_mirror(str(root / "mirror"), rows_per_split=ROWS)
    make_tiny_qwen2_moe(str(root / "moe"))
    make_dense_qwen2(str(root / "dense"))
    return root


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "router_upcycling.eval", *args], capture_output=True, text=True)


def check_groups(results):
    scores = {key: entry["score"] for key, entry in results["tasks"].items()}
    for group in ("understanding", "reasoning", "knowledge"):
        members = [scores[t.key] for t in SUITE if t.group == group and t.key in scores]
        assert results["groups"][group] == (pytest.approx(mean(members)) if members else None)
    assert results["groups"]["average"] == pytest.approx(mean(scores.values()))


def test_eval_all_ten_tasks_on_a_stock_qwen2_moe_folder(workspace):
    output = workspace / "moe_results.json"
    result = run_cli("--model", str(workspace / "moe"), "--data-dir", str(workspace / "mirror"), "--limit", str(LIMIT),
                     "--batch-size", "16", "--gen-max-tokens", "4", "--device", "cpu", "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(output.read_text())
    assert set(results) == {"model", "tasks", "groups", "lm_eval_version", "settings"}
    assert results["lm_eval_version"] == "0.4.13" and results["settings"]["num_fewshot"] == 0
    assert list(results["tasks"]) == [task.key for task in SUITE]
    for key, entry in results["tasks"].items():
        assert set(entry) == {"metric", "score", "n", "all"}
        assert entry["n"] == LIMIT and 0.0 <= entry["score"] <= 100.0
        assert entry["score"] == pytest.approx(100 * entry["all"][entry["metric"]])
    metrics = {key: entry["metric"] for key, entry in results["tasks"].items()}
    assert metrics["obqa"] == metrics["hellaswag"] == "acc_norm,none"
    assert metrics["winogrande"] == metrics["copa"] == "acc,none"
    assert metrics["nq_open"] == metrics["triviaqa"] == "exact_match,remove_whitespace"
    assert "acc,none" in results["tasks"]["obqa"]["all"]
    check_groups(results)
    table = result.stdout
    assert "| OBQA-fact |" in table and "| **Average** |" in table and list(PAPER_REFERENCE_RUNS)[1] in table
    assert "| **Average** | " + f"{results['groups']['average']:.2f} | 43.78 | 45.83 |" in table


def test_eval_dense_qwen2_subset_averages_only_present_tasks(workspace):
    tasks = resolve_tasks("arc_easy,obqa,winogrande")
    settings = EvalSettings(tasks=[t.key for t in tasks], data_dir=str(workspace / "mirror"), limit=LIMIT, device="cpu", mc_metric="acc")
    results = run_suite(str(workspace / "dense"), tasks, settings)
    assert list(results["tasks"]) == ["obqa", "arc_easy", "winogrande"]
    assert all(entry["metric"] == "acc,none" for entry in results["tasks"].values())
    assert results["groups"]["knowledge"] is None
    check_groups(results)


def test_eval_few_shot_reads_the_training_split(workspace):
    tasks = resolve_tasks("copa,nq_open")
    settings = EvalSettings(tasks=[t.key for t in tasks], data_dir=str(workspace / "mirror"), limit=3, num_fewshot=2,
                            device="cpu", gen_max_tokens=2)
    results = run_suite(str(workspace / "moe"), tasks, settings)
    assert [entry["n"] for entry in results["tasks"].values()] == [3, 3]


def test_eval_bad_inputs_fail_with_one_line(workspace, tmp_path):
    model, mirror = str(workspace / "moe"), str(workspace / "mirror")
    missing = run_cli("--model", str(tmp_path / "nope"), "--data-dir", mirror)
    unknown = run_cli("--model", model, "--data-dir", mirror, "--tasks", "obqa,mmlu")
    no_mirror = run_cli("--model", model, "--data-dir", str(tmp_path / "empty"), "--tasks", "copa")
    existing = tmp_path / "results.json"
    existing.write_text("keep")
    taken = run_cli("--model", model, "--data-dir", mirror, "--output", str(existing))
    for result in (missing, unknown, no_mirror, taken):
        assert result.returncode != 0
        assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no config.json" in missing.stderr
    assert "unknown task 'mmlu'" in unknown.stderr
    assert str(tmp_path / "empty" / "aps/super_glue/copa/validation.jsonl") in no_mirror.stderr
    assert "--force" in taken.stderr and existing.read_text() == "keep"
