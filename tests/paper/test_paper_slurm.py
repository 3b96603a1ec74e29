"""The paper matrix for real on a one-node Slurm started by the test: Table 1's runs at toy size (tiny dense model,
a few steps, 1 rank), every stage a Slurm job, end to end to tables.md; then a rerun that submits nothing."""
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slurm_cluster import REPO_ROOT, slurm_cluster, slurm_env  # noqa: E402,F401

from router_upcycling.eval.report import PAPER_TABLES  # noqa: E402
from router_upcycling.eval.sample_data import write_sample_mirror  # noqa: E402
from router_upcycling.settings.routers import router_names  # noqa: E402
from router_upcycling.paper import slurm  # noqa: E402
from router_upcycling.paper.matrix import RunLayout  # noqa: E402
from router_upcycling.paper.recipes import load_recipe  # noqa: E402
from router_upcycling.testing import SAMPLE_TEXT, make_dense_qwen2, write_token_documents  # noqa: E402

TIMEOUT_S = 1200


def table_1_runs() -> list:
    """Table 1's runs, every one of whose routers this checkout has."""
    runs = [run for run, _ in PAPER_TABLES[1][1]]
    for run in runs:
        recipe = load_recipe(run)
        assert (recipe.upcycle["router"] if recipe.upcycle else recipe.train["moe-router-type"]) in router_names(), run
    return runs


def write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def matrix_args(tmp_path: Path, runs: list) -> list:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    dense = make_dense_qwen2(str(inputs / "dense"), seed=3)
    write_token_documents(str(inputs / "tokens_text_document"))
    write_sample_mirror(str(inputs / "mirror"), rows_per_split=4, include_fewshot=False)
    return ["--runs", *runs, "--profile", "toy_cpu", "--dense-model", f"Qwen1.5-0.5B={dense}",
            "--calib-data", str(write_jsonl(inputs / "calib.jsonl", SAMPLE_TEXT)),
            "--data-path", str(inputs / "tokens_text_document"), "--output-root", str(tmp_path / "runs"),
            "--eval-data-dir", str(inputs / "mirror"),
            "--routing-domain", f"code={write_jsonl(inputs / 'code.jsonl', SAMPLE_TEXT[1::4])}",
            "--routing-domain", f"prose={write_jsonl(inputs / 'prose.jsonl', SAMPLE_TEXT[::3])}"]


def run_tool(name: str, args: list) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "tools" / name), *args], capture_output=True, text=True,
                          env=slurm_env(), timeout=300)


def wait_for_jobs(job_ids: set, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while slurm.active_jobs(job_ids):
        assert time.monotonic() < deadline, f"jobs still queued or running after {timeout_s} s: {slurm.active_jobs(job_ids)}"
        time.sleep(2)


def logs_of(layout: RunLayout) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in sorted(layout.logs.glob("*.log")))


def test_table_1_runs_end_to_end_on_slurm_and_resume_without_resubmitting(slurm_cluster, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster))
    runs = table_1_runs()
    assert runs == ["scratch", "vanilla", "switch", "locmoe", "mlp", "mor"]
    args = matrix_args(tmp_path, runs)
    started = time.monotonic()
    first = run_tool("paper_matrix.py", args)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert [line.split()[0] for line in lines] == runs
    assert all(":queued(" in state or ":running(" in state for line in lines for state in line.split()[1:]), first.stdout
    layouts = {run: RunLayout(str(tmp_path / "runs"), run) for run in runs}
    jobs = {run: layout.recorded_jobs() for run, layout in layouts.items()}
    assert list(jobs["scratch"]) == ["train", "export", "eval", "routing"] and len(jobs["mor"]) == 5

    wait_for_jobs({job for run_jobs in jobs.values() for job in run_jobs.values()}, TIMEOUT_S)
    print(f"{len(runs)} runs end to end on Slurm in {time.monotonic() - started:.0f} s", file=sys.stderr)
    for run, layout in layouts.items():
        recipe = load_recipe(run, "toy_cpu")
        assert all(layout.done(stage, recipe.train_iters) for stage in recipe.stages), f"{run}:\n{logs_of(layout)}"
        assert json.loads(layout.results.read_text())["settings"]["limit"] == 2
    assert "python -m router_upcycling.commands.convert" in (layouts["mor"].logs / f"upcycle-{jobs['mor']['upcycle']}.log").read_text()

    again = run_tool("paper_matrix.py", args)
    assert again.returncode == 0, again.stderr
    assert [line.split()[1:] for line in again.stdout.splitlines()] == [
        [f"{stage}:done" for stage in load_recipe(run).stages] for run in runs]
    assert {run: layout.recorded_jobs() for run, layout in layouts.items()} == jobs  # nothing submitted

    made = run_tool("paper_tables.py", ["--output-root", str(tmp_path / "runs"), "--output", str(tmp_path / "tables")])
    assert made.returncode == 0, made.stderr
    table_1 = (tmp_path / "tables" / "tables.md").read_text().split("## Table 2")[0]
    for run in runs:
        row = next(line for line in table_1.splitlines() if f"(`{run}`)" in line)
        assert "- /" not in row and row.endswith("| 4 steps, 1.0K tokens; 2 rows/task |"), row
    assert (tmp_path / "tables" / "table1_loss.png").is_file()
