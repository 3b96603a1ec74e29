"""tools/paper_matrix.py without a cluster: the dry-run plan, one-line errors, and which stages a rerun submits."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from router_upcycling.paper.inputs import Inputs, MatrixError
from router_upcycling.paper.matrix import RunLayout, StageState, check_started_with, plan_run, run_settings
from router_upcycling.paper.recipes import RUN_NAMES, load_recipe
from router_upcycling.paper.slurm import JobStatus

TOOL = Path(__file__).resolve().parents[2] / "tools" / "paper_matrix.py"


def matrix(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=120)


def assert_one_line_error(result, fragment):
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr


def test_dry_run_without_paths_prints_the_plan_with_placeholders():
    result = matrix("--runs", "all", "--dry-run", "--show-commands")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    status = [line for line in lines if not line.startswith(" ")]
    assert [line.split()[0] for line in status] == RUN_NAMES
    assert status[0].split()[1:] == ["train:todo", "export:todo", "eval:todo", "routing:todo"]  # scratch: nothing to upcycle
    assert status[1].split()[1:] == ["upcycle:todo", "train:todo", "export:todo", "eval:todo", "routing:todo"]
    commands = "\n".join(lines)
    assert sum(line.startswith("    sbatch ") for line in lines) == 4 + 5 * (len(RUN_NAMES) - 1)
    assert "--hf-model '<dense Qwen1.5-1.8B>'" in commands and "--data-path '<data-path>'" in commands
    assert "--calib-data '<calib-data>'" in commands and "--data-dir '<eval-data-dir>'" in commands
    assert "'--dependency=afterok:<upcycle job>' scripts/slurm/paper_train.sbatch" in commands
    assert "--nodes=8 --ntasks-per-node=1 --gpus-per-node=8 --exclusive" in commands


@pytest.mark.parametrize("args,fragment", [
    (["--runs", "mor", "mixtral", "--dry-run"], "unknown run 'mixtral'; runs: all, scratch"),
    (["--runs", "mor"], "--dense-model Qwen1.5-0.5B=FOLDER is required (or use --dry-run)"),
    (["--runs", "mor", "--dry-run", "--dense-model", "Qwen1.5-0.5B"], "--dense-model expects BACKBONE=FOLDER"),
    (["--runs", "mor", "--dry-run", "--dense-model", "Qwen1.5-0.5B=/nowhere"], "no Hugging Face model (config.json) in /nowhere"),
    (["--runs", "mor", "--dry-run", "--data-path", "/nowhere/data"], "/nowhere/data.bin and .idx not found"),
    (["--runs", "mor", "--dry-run", "--routing-domain", "code"], "--routing-domain expects NAME=FILE"),
    (["--runs", "mor", "--dry-run", "--set", "lr=1"], "--set expects SECTION.FLAG=VALUE"),
    (["--runs", "mor", "--dry-run", "--profile", "huge"], "profile 'huge' not found"),
    (["--runs", "mor", "--dry-run", "--train-iters", "0"], "--train-iters must be at least 1, got 0"),
    (["--runs", "mor", "--dry-run", "--set", "train.lr=-1e-4"], "recipe mor: train lr must be a positive number, got -0.0001"),
    (["--runs", "mor", "--dry-run", "--set", "train.train-iters=2.5"], "recipe mor: train-iters must be an integer of at least 1"),
    (["--runs", "mor", "--dry-run", "--set", "train.no_such_flag=1"], "recipe mor: train has no flag --no-such-flag"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, fragment):
    assert_one_line_error(matrix(*args, "--output-root", tmp_path / "root"), fragment)
    assert not (tmp_path / "root").exists()


def test_a_real_run_needs_every_path(tmp_path):
    assert_one_line_error(matrix("--runs", "mor"), "--output-root is required (or use --dry-run)")
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text("{}")
    result = matrix("--runs", "8x1.8b-mor", "--output-root", tmp_path / "root", "--dense-model", f"Qwen1.5-0.5B={dense}")
    assert_one_line_error(result, "--dense-model Qwen1.5-1.8B=FOLDER is required")
    result = matrix("--runs", "vanilla", "--output-root", tmp_path / "root", "--dense-model", f"Qwen1.5-0.5B={dense}")
    assert_one_line_error(result, "--data-path is required")  # vanilla needs no calibration text
    assert not (tmp_path / "root").exists()


def mark_done(layout: RunLayout, stage: str, iteration: str = "4") -> None:
    folder = {"upcycle": layout.upcycled, "train": layout.train, "export": layout.hf, "routing": layout.routing}.get(stage)
    if stage in ("upcycle", "train"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "latest_checkpointed_iteration.txt").write_text("release" if stage == "upcycle" else iteration)
    elif stage == "eval":
        layout.results.parent.mkdir(parents=True, exist_ok=True)
        layout.results.write_text("{}")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ("config.json" if stage == "export" else "routing.json")).write_text("{}")


def states(plan):
    return [str(state) for state in plan]


def test_rerun_skips_done_stages_and_live_jobs(tmp_path):
    recipe = load_recipe("mor", "toy_cpu")
    layout = RunLayout(str(tmp_path), "mor")
    mark_done(layout, "upcycle")
    mark_done(layout, "train", iteration="2")  # a checkpoint short of train-iters (4): not done
    for stage, job in {"train": "11", "export": "12", "eval": "13", "routing": "14"}.items():
        layout.record_job(stage, job)
    live = {"11": JobStatus("11", "RUNNING", "None"), "12": JobStatus("12", "PENDING", "Dependency"),
            "13": JobStatus("13", "PENDING", "Dependency"), "14": JobStatus("14", "PENDING", "Dependency")}
    assert states(plan_run(recipe, layout, live)) == [
        "upcycle:done", "train:running(11)", "export:queued(12)", "eval:queued(13)", "routing:queued(14)"]
    mark_done(layout, "train", iteration="4")
    mark_done(layout, "export")
    mark_done(layout, "eval")
    assert states(plan_run(recipe, layout, {"14": live["14"]})) == [
        "upcycle:done", "train:done", "export:done", "eval:done", "routing:queued(14)"]


def test_a_job_that_died_is_submitted_again_with_every_stage_waiting_on_it(tmp_path):
    recipe = load_recipe("mor", "toy_cpu")
    layout = RunLayout(str(tmp_path), "mor")
    mark_done(layout, "upcycle")
    for stage, job in {"train": "11", "export": "12", "eval": "13", "routing": "14"}.items():
        layout.record_job(stage, job)
    # the training job failed: its dependants are pending forever (or were cancelled by --kill-on-invalid-dep)
    live = {"12": JobStatus("12", "PENDING", "DependencyNeverSatisfied"), "13": JobStatus("13", "PENDING", "Dependency")}
    plan = plan_run(recipe, layout, live)
    assert states(plan) == ["upcycle:done", "train:todo", "export:todo", "eval:todo", "routing:todo"]
    assert [state.replaces for state in plan] == [None, None, "12", "13", None]


def test_without_an_output_root_everything_is_to_do():
    plan = plan_run(load_recipe("scratch"), None, {})
    assert plan == [StageState(stage, "todo") for stage in ("train", "export", "eval", "routing")]


def test_stages_that_started_keep_their_settings(tmp_path):
    layout = RunLayout(str(tmp_path), "mor")
    layout.dir.mkdir()
    inputs = Inputs(output_root=str(tmp_path))
    layout.recipe.write_text(yaml.safe_dump(run_settings(load_recipe("mor", "toy_cpu"), inputs)))

    def check(*overrides):
        check_started_with(load_recipe("mor", "toy_cpu", overrides), inputs, {}, dry_run=True)

    check("train.train-iters=6")  # nothing started yet: new settings are taken
    mark_done(layout, "upcycle")
    mark_done(layout, "train", iteration="2")  # training has a checkpoint
    check("eval.limit=3", "routing.max-tokens=128")  # eval and routing have not started
    with pytest.raises(MatrixError, match=r"its upcycle stage started with other settings \(recipe.upcycle.calib-tokens: 1024 -> 2048\)"):
        check("upcycle.calib-tokens=2048")
    result = matrix("--runs", "mor", "--dry-run", "--profile", "toy_cpu", "--train-iters", "6", "--output-root", tmp_path)
    assert_one_line_error(result, f"{layout.dir}: its train stage started with other settings (recipe.train.train-iters: 4 -> 6)")
