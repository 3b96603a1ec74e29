"""A damaged newest checkpoint (a preempted write, a truncated shard, a broken common state or index): training's
auto-resume falls back to the newest readable iteration and says which it skipped and why; export names the file and
the iterations that do read, and takes --iteration."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from router_upcycling.checkpoint_folder import read_tracker
from training_runs import run, train_flags, train_losses

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def saved(inputs, tmp_path_factory):
    """4 steps with checkpoints at 2 and 4."""
    save = tmp_path_factory.mktemp("damaged") / "run"
    flags = train_flags(inputs, save, "--save-interval", "2", "--eval-iters", "0")
    flags[flags.index("--train-iters") + 1] = "4"
    run(flags)
    return save


def truncate_shard(folder: Path):
    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def corrupt(name: str):
    def damage(folder: Path):
        (folder / name).write_bytes(b"not what was saved")
    return damage


DAMAGES = {"truncated shard": (truncate_shard, "is truncated"), "common state": (corrupt("common.pt"), "common.pt is missing or damaged"),
           "tensor index": (corrupt(".metadata"), ".metadata is missing or damaged")}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_skips_a_damaged_newest_checkpoint(inputs, saved, tmp_path, damage):
    spoil, message = DAMAGES[damage]
    save = tmp_path / "run"
    shutil.copytree(saved, save)
    spoil(save / "iter_0000004")
    flags = train_flags(inputs, save, "--load", str(save), "--eval-iters", "0")
    flags[flags.index("--train-iters") + 1] = "6"
    output = run(flags)
    assert "resuming from" in output and "skipped iter_0000004" in output and message in output, output[-3000:]
    assert "resuming at step 2" in output and read_tracker(save) == "6"
    assert {3, 4, 5, 6} <= set(train_losses(save))


TRACKER_DAMAGES = {"missing": lambda tracker: tracker.unlink(), "garbage": lambda tracker: tracker.write_text("garbage"),
                   "empty": lambda tracker: tracker.write_text("")}


@pytest.mark.parametrize("damage", list(TRACKER_DAMAGES))
def test_resume_without_a_readable_tracker_checks_the_iterations_themselves(inputs, saved, tmp_path, damage):
    """A preemption while the tracker was written (or a lost tracker): the newest iteration that reads is resumed,
    never a fresh start over the saved ones; the metrics of the steps that run again are not kept twice."""
    import json

    save = tmp_path / "run"
    shutil.copytree(saved, save)
    TRACKER_DAMAGES[damage](save / "latest_checkpointed_iteration.txt")
    truncate_shard(save / "iter_0000004")
    flags = train_flags(inputs, save, "--load", str(save), "--eval-iters", "0")
    flags[flags.index("--train-iters") + 1] = "6"
    output = run(flags)
    tracker_line = "is missing" if damage == "missing" else "names no iteration"
    assert "resuming from iter_0000002, the newest iteration that reads" in output and tracker_line in output, output[-3000:]
    assert "skipped iter_0000004" in output and "resuming at step 2" in output and read_tracker(save) == "6"
    steps = [json.loads(line)["step"] for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert sorted(steps) == steps and len(steps) == len(set(steps)) and {3, 4, 5, 6} <= set(steps), steps


def test_export_without_a_readable_tracker_lists_the_saved_iterations(saved, tmp_path):
    save = tmp_path / "run"
    shutil.copytree(saved, save)
    (save / "latest_checkpointed_iteration.txt").write_text("garb")
    result = convert("export", "--checkpoint", save, "--output", tmp_path / "hf", "--format", "mor")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert "latest_checkpointed_iteration.txt is damaged: 'garb' names no iteration; saved: iter_0000004, iter_0000002 " \
           "(choose one with --iteration N)" in result.stderr
    result = convert("export", "--checkpoint", save, "--output", tmp_path / "hf", "--format", "mor", "--iteration", -1)
    assert result.returncode == 2 and "--iteration must be a saved iteration" in result.stderr
    assert not (tmp_path / "hf").exists()


def convert(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_export_names_the_damaged_file_and_takes_an_older_iteration(saved, tmp_path):
    save = tmp_path / "run"
    shutil.copytree(saved, save)
    truncate_shard(save / "iter_0000004")
    result = convert("export", "--checkpoint", save, "--output", tmp_path / "hf", "--format", "mor")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "iter_0000004" in line and "is truncated" in line and "readable: iter_0000002 (choose one with --iteration N)" in line
    assert not (tmp_path / "hf").exists()
    assert convert("export", "--checkpoint", save, "--output", tmp_path / "hf", "--format", "mor", "--iteration", 2).returncode == 0
    (save / "router_upcycling.json").write_text("{ not json")
    result = convert("export", "--checkpoint", save, "--output", tmp_path / "hf2", "--format", "mor")
    assert result.returncode == 2 and "router_upcycling.json is damaged (not valid JSON" in result.stderr, result.stderr


def test_no_readable_checkpoint_is_one_line(inputs, saved, tmp_path, capsys):
    from router_upcycling.train.cli import main

    save = tmp_path / "run"
    shutil.copytree(saved, save)
    for name in ("iter_0000002", "iter_0000004"):
        corrupt("common.pt")(save / name)
    with pytest.raises(SystemExit) as stop:
        main(train_flags(inputs, save, "--load", str(save)))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and err.startswith("error: --load") and "holds no readable checkpoint" in err
