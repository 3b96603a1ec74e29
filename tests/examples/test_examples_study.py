"""The study's report (examples/quickstart/study.py) from run folders laid out as the study writes them: paired
differences only for finished runs, the calibration tokens the checkpoints record, and the health tables."""
import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # examples/ is not an installed package; it runs from the repository root

from examples.quickstart.run import DemoSettings, Layout, QuickstartError  # noqa: E402
from examples.quickstart.study import HEALTH_KEYS, REPORT_TITLE, fill_docs, main, runs, write_study  # noqa: E402

LAST = DemoSettings().train_iters


def health(top1: float) -> list:
    return [{"max_share": 0.2, "dead_experts": 0, "top1_weight": top1, "logit_std": 1.0, "entropy": 2.0}] * 2


def write_run(layout: Layout, name: str, seed: int, val_loss: float, last_step: int = LAST) -> None:
    save = layout.trained(name, seed)
    save.mkdir(parents=True)
    records = [{"step": 5, "loss": 3.0, "routing_health": health(0.9)},
               {"step": last_step, "loss": 2.5, "val_loss": val_loss, "routing_health": health(0.95)}]
    (save / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def write_upcycled(layout: Layout, name: str, seed: int, tokens: int) -> None:
    folder = layout.upcycled_run(runs()[name], seed)
    folder.mkdir(parents=True)
    (folder / "router_upcycling.json").write_text(json.dumps({"calibration": {"tokens": tokens, "requested_tokens": 10**6}}))


def test_report_pairs_finished_runs_by_seed(tmp_path):
    layout = Layout(tmp_path)
    for seed, (vanilla, mor) in {1: (2.10, 2.12), 2: (2.20, 2.21)}.items():
        write_run(layout, "vanilla", seed, vanilla)
        write_run(layout, "mor", seed, mor)
    write_run(layout, "vanilla", 3, 2.0)
    write_run(layout, "mor", 3, 9.0, last_step=50)  # still training: its last validation is not final
    write_run(layout, "mor-r4", 1, 2.05)
    write_upcycled(layout, "mor", 1, 32768)
    write_upcycled(layout, "mor-calib-small", 1, 1234)  # fewer than asked for: the report says what was used
    step0 = {"vanilla": {"routing_health": health(0.53)}, "mor": {"routing_health": health(0.92)}}

    write_study(tmp_path, [1, 2, 3], list(runs()), 0.0143, step0)

    table = (tmp_path / "study.md").read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    paper = next(line for label, line in rows.items() if label.startswith("paper setting"))
    assert "+0.0150 ± 0.0071 | +0.0200 | +0.0100 |  | 32,768 |" in paper
    assert "| -0.0500 (1 seed) | -0.0500 |" in rows["R = 4 routers"]
    assert "| not run |" in rows["max aggregation"] and rows["calibration: 4,096 tokens (1/8)"].endswith("| 1,234 |")
    assert "| mor | 0.2 (0.2-0.2) | 0 (0-0) | 0.92 (0.92-0.92) |" in table
    assert "| mor (2 seeds) | 300 | 0.2 | 0 | 0.95 | 1 | 2 |" in table  # seed 3 has not finished
    result = json.loads((tmp_path / "study.json").read_text())
    assert result["matched_router_scale"] == 0.0143 and set(result["runs"]["vanilla"]["1"]["health"]["5"]) == set(HEALTH_KEYS) - {"tied_choice"}  # recorded before it existed


def test_docs_block_is_replaced_and_the_rest_kept(tmp_path):
    docs = tmp_path / "results.md"
    docs.write_text("# Results\n\nbefore\n\n<!-- study:begin (note) -->\nold table\n<!-- study:end -->\n\nReading: kept\n")
    report = REPORT_TITLE + "\n\n| variant |\n|---|\n\n## Routing health at step 0\n\n| run |\n"

    fill_docs(docs, report)

    assert docs.read_text() == ("# Results\n\nbefore\n\n<!-- study:begin (note) -->\n| variant |\n|---|\n\n"
                                "### Routing health at step 0\n\n| run |\n<!-- study:end -->\n\nReading: kept\n")
    fill_docs(docs, report)  # idempotent: the block is found again and replaced
    assert docs.read_text().count("### Routing health at step 0") == 1


def test_docs_without_markers_is_a_one_line_error_and_untouched(tmp_path):
    docs = tmp_path / "results.md"
    docs.write_text("no markers here\n")
    with pytest.raises(QuickstartError, match="no '<!-- study:begin"):
        fill_docs(docs, "## Ablation\n\n| variant |\n")
    assert docs.read_text() == "no markers here\n"


def test_cli_docs_without_markers_stops_before_anything_is_written(tmp_path, capsys):
    docs = tmp_path / "results.md"
    docs.write_text("no markers here\n")
    with pytest.raises(SystemExit) as stop:
        main(["--output", str(tmp_path / "study"), "--report-only", "--docs", str(docs)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "study:begin" in err
    assert not (tmp_path / "study").exists() and docs.read_text() == "no markers here\n"
