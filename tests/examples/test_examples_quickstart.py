"""The quickstart pipeline end to end in its --smoke sizes (real tools, real torchrun training on 2 ranks),
its resume and its refusals, plus the corpus builder's determinism."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # examples/ is not an installed package; it runs from the repository root

from examples.quickstart.corpus import CorpusSizes, build_corpus, interleave_domains  # noqa: E402


def run_quickstart(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "examples.quickstart.run", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("quickstart") / "run"
    result = run_quickstart("--output", str(output), "--smoke")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return output, result.stdout


def test_smoke_run_writes_the_report_with_plots_and_tables(smoke_run):
    output, stdout = smoke_run
    report = (output / "report.md").read_text()
    for png in ("loss_curves.png", "routing.png", "routing/vanilla/routing.png", "routing/mor/routing.png"):
        assert (output / png).stat().st_size > 1000
    assert "](loss_curves.png)" in report and "](routing.png)" in report
    assert "dead experts (under 10% of a fair share in every domain)" in report
    assert "Validation is the last 2% of the training file's documents (`--split 98,2,0`" in report
    for heading in ("## Corpus", "## Continued training", "## Held-out evaluation", "## Routing diversity", "## Time per stage"):
        assert heading in report
    assert report.count(": OK") == 2  # both upcycled checkpoints computed the dense model's logits
    calibration = json.loads((output / "upcycled" / "mor" / "router_upcycling.json").read_text())["calibration"]
    assert f"average keys of {calibration['tokens']:,} calibration tokens" in report  # the count used, as recorded
    evaluation = json.loads((output / "evaluation.json").read_text())
    assert set(evaluation) == {"dense (before upcycling)", "vanilla", "mor"}
    assert all(set(per_domain) == {"code", "prose", "math"} for per_domain in evaluation.values())
    for name in ("vanilla", "mor"):
        records = [json.loads(line) for line in (output / "train" / "seed1" / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "lm_loss" in r] == [1, 2, 3, 4]
    assert "train mor (seed 1): done in" in stdout


def test_rerun_skips_every_finished_stage(smoke_run):
    output, _ = smoke_run
    before = (output / "evaluation.json").read_text()
    result = run_quickstart("--output", str(output), "--smoke")
    assert result.returncode == 0, result.stderr[-3000:]
    assert " ..." not in result.stdout  # no stage started again
    assert result.stdout.count("done before, skipped") == 14
    assert (output / "evaluation.json").read_text() == before


def test_other_settings_in_the_same_folder_are_refused_without_touching_it(smoke_run):
    output, _ = smoke_run
    result = run_quickstart("--output", str(output), "--smoke", "--train-iters", "6")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {output} was made with other settings (--smoke or --train-iters differ); pass --fresh to start over or choose another --output"]
    assert (output / "report.md").is_file()


def test_a_folder_that_is_not_a_quickstart_run_is_refused(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    result = run_quickstart("--output", str(tmp_path), "--smoke", "--fresh")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --output {tmp_path} holds files that are not a quickstart run; choose another folder"
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_corpus_is_deterministic_and_keeps_heldout_documents_out_of_training(tmp_path):
    sizes = CorpusSizes(train_chars=5_000, heldout_chars=1_000)
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    stats = build_corpus(str(first), sizes, seed=3)
    build_corpus(str(second), sizes, seed=3)
    assert (first / "train.jsonl").read_bytes() == (second / "train.jsonl").read_bytes()
    train = [json.loads(line) for line in (first / "train.jsonl").read_text().splitlines()]
    assert {row["domain"] for row in train} == {"code", "prose", "math"}
    train_texts = {row["text"] for row in train}
    for domain, counts in stats.items():
        heldout = [json.loads(line)["text"] for line in (first / "heldout" / f"{domain}.jsonl").read_text().splitlines()]
        assert heldout and not train_texts & set(heldout)
        assert counts["train_chars"] >= sizes.train_chars - 4000 and counts["heldout_chars"] >= sizes.heldout_chars
    math_line = next(row["text"] for row in train if row["domain"] == "math").splitlines()[0]
    left, right = math_line.split(" = ")
    assert eval(left) == int(right)  # the equations are correct


def test_any_stretch_of_the_training_file_holds_the_domains_in_proportion():
    """Training's --split cuts the file by document count: its validation tail must hold what training holds, even
    when one domain's documents are ten times longer than another's."""
    import random

    rows = interleave_domains({"short": ["s" * 10] * 500, "long": ["l" * 100] * 50}, random.Random(0))
    assert len(rows) == 550
    for start in (0, 275, 539):
        stretch = rows[start:start + 11]  # 2% of the documents
        chars = {domain: sum(len(r["text"]) for r in stretch if r["domain"] == domain) for domain in ("short", "long")}
        assert chars["long"] in (100, 200) and 50 <= chars["short"] <= 150, chars
