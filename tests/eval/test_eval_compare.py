"""tools/compare_results.py: side-by-side table and grouped bar chart."""
import json
import subprocess
import sys
from pathlib import Path

from router_upcycling.eval.report import group_scores
from router_upcycling.eval.tasks import SUITE

REPO = Path(__file__).resolve().parents[2]


def write_results(path, scores):
    tasks = {key: {"metric": "acc,none", "score": score, "n": 10, "all": {"acc,none": score / 100}} for key, score in scores.items()}
    path.write_text(json.dumps({"model": path.stem, "tasks": tasks, "groups": group_scores(scores),
                                "lm_eval_version": "0.4.13", "settings": {}}))
    return str(path)


def run_compare(*args):
    return subprocess.run([sys.executable, str(REPO / "tools/compare_results.py"), *args], capture_output=True, text=True)


def test_eval_compare_prints_columns_and_saves_a_png(tmp_path):
    first = write_results(tmp_path / "first.json", {task.key: 10.0 + i for i, task in enumerate(SUITE)})
    second = write_results(tmp_path / "second.json", {"obqa": 50.0, "boolq": 70.0})
    chart = tmp_path / "chart.png"
    result = run_compare(first, second, "--names", "A,B", "--output", str(chart))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "| task | A | B | paper: vanilla upcycling | paper: Router Upcycling |"
    assert "| OBQA | 10.00 | 50.00 | 40.80 | 42.60 |" in lines
    assert "| ARC-C | 12.00 | - | 39.66 | 42.37 |" in lines
    assert "| **Understanding** | 10.50 | 50.00 | 49.40 | 50.80 |" in lines
    assert "| **Average** | 14.50 | 60.00 | 43.78 | 45.83 |" in lines
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_compare_bad_inputs(tmp_path):
    good = write_results(tmp_path / "good.json", {"obqa": 1.0})
    (tmp_path / "bad.json").write_text("{not json")
    chart = tmp_path / "chart.png"
    chart.write_bytes(b"keep")
    cases = [
        run_compare(str(tmp_path / "missing.json")),
        run_compare(str(tmp_path / "bad.json")),
        run_compare(good, "--names", "A,B"),
        run_compare(good, "--output", str(chart)),
    ]
    nan = json.loads(Path(good).read_text())
    nan["tasks"]["obqa"]["score"] = float("nan")
    (tmp_path / "nan.json").write_text(json.dumps(nan))
    (tmp_path / "afile").write_text("")
    messages = {
        run_compare(str(tmp_path / "nan.json")): "every entry of 'tasks' must be an object with a finite numeric 'score'",
        run_compare(good, "--output", str(tmp_path / "afile" / "x.png")): f"its folder {tmp_path / 'afile'} is a file",
        run_compare(good, "--output", str(tmp_path / "chart.txt")): "the chart is a PNG",
    }
    for result in [*cases, *messages]:
        assert result.returncode != 0 and result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for result, message in messages.items():
        assert message in result.stderr, result.stderr
    assert chart.read_bytes() == b"keep" and not (tmp_path / "chart.txt").exists()
