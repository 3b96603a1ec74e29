"""tools/paper_tables.py: Tables 1-4 from whatever runs have results, the paper's numbers beside ours, loss PNGs."""
import json
import subprocess
import sys
from pathlib import Path

import yaml

from router_upcycling.eval.report import PAPER_RESULTS, PAPER_TABLES
from router_upcycling.eval.tasks import SUITE
from router_upcycling.paper.matrix import RunLayout
from router_upcycling.paper.recipes import load_recipe

TOOL = Path(__file__).resolve().parents[2] / "tools" / "paper_tables.py"


def tables(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=120)


def fake_run(root: Path, name: str, score: float, steps: int = 4) -> None:
    """What the matrix leaves in ROOT/NAME: recipe.yaml, train/metrics.jsonl, results.json (every task at `score`)."""
    layout = RunLayout(str(root), name)
    recipe = load_recipe(name, "toy_cpu", [f"train.train-iters={steps}"])
    layout.dir.mkdir(parents=True)
    layout.recipe.write_text(yaml.safe_dump({"recipe": recipe.as_dict(), "inputs": {}}))
    layout.train.mkdir()
    records = [{"step": s, "lm_loss": 6.0 - 0.1 * s} for s in range(1, steps + 1)] + [{"step": steps, "val_loss": 5.5}]
    layout.metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    tasks = {t.key: {"metric": "acc,none", "score": score, "n": 2, "all": {}} for t in SUITE}
    groups = {g: score for g in ("understanding", "reasoning", "knowledge", "average")}
    layout.results.write_text(json.dumps({"model": "hf", "tasks": tasks, "groups": groups, "settings": {"limit": 2}}))


def test_tables_put_ours_beside_the_paper_and_leave_missing_runs_empty(tmp_path):
    root = tmp_path / "runs"
    fake_run(root, "mor", 50.0)
    fake_run(root, "vanilla", 40.0, steps=6)
    result = tables("--output-root", root, "--output", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "out" / "tables.md").read_text()
    sections = text.split("\n## Table ")[1:]
    for section, (number, (title, runs)) in zip(sections, PAPER_TABLES.items()):
        assert section.startswith(f"{number}: {title}")
        rows = [line for line in section.splitlines() if line.startswith("| ") and "(`" in line]
        assert [row.split("(`")[1].split("`)")[0] for row in rows] == [run for run, _ in runs]
    row = next(line for line in text.splitlines() if line.startswith("| Router Upcycling (`mor`)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "50.00 / 42.60 (+7.40)"          # OBQA: ours / paper (difference)
    assert cells[14] == "50.00 / 45.83 (+4.17)"         # Average, as the paper prints it
    assert cells[15] == "4 steps, 1.0K tokens; 2 rows/task"
    switch = next(line for line in text.splitlines() if "(`switch`)" in line)
    assert "- / 27.60 |" in switch and switch.endswith("| - |")  # no results yet: an empty row with the paper's numbers
    assert f"- / {PAPER_RESULTS['max'][0]:.2f}" in text
    for number in (1, 2, 3):  # tables with vanilla or mor have curves; Table 4 has mor too
        assert (tmp_path / "out" / f"table{number}_loss.png").stat().st_size > 1000
    assert "![Table 1: loss against training tokens](table1_loss.png)" in text


def test_an_empty_root_gives_empty_tables_and_outputs_are_not_overwritten(tmp_path):
    (tmp_path / "runs").mkdir()
    assert tables("--output-root", tmp_path / "runs", "--output", tmp_path / "out").returncode == 0
    assert "No run of this table has training metrics yet." in (tmp_path / "out" / "tables.md").read_text()
    again = tables("--output-root", tmp_path / "runs", "--output", tmp_path / "out")
    assert again.returncode != 0 and again.stderr.startswith("error:") and "--force" in again.stderr
    (tmp_path / "runs" / "mor").mkdir()
    (tmp_path / "runs" / "mor" / "results.json").write_text("{not json")
    broken = tables("--output-root", tmp_path / "runs", "--output", tmp_path / "out2")
    assert broken.returncode != 0 and broken.stderr.startswith("error:") and "results.json is not JSON" in broken.stderr
    missing = tables("--output-root", tmp_path / "nowhere", "--output", tmp_path / "out2")
    assert missing.returncode != 0 and missing.stderr.strip() == f"error: --output-root {tmp_path / 'nowhere'}: not a folder"
    assert not (tmp_path / "out2").exists()
