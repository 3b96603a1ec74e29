"""The Slurm recipes: static checks of every script, and real jobs on a one-node local cluster.

The jobs go through scripts/slurm/launch.sh with LAUNCH_MODULE pointing at tests/fixtures/slurm_probe.py,
a 2-rank gloo all-reduce, exactly as the training sbatch files start router_upcycling.train.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slurm_cluster import (  # noqa: E402
    REPO_ROOT,
    job_state,
    slurm_cluster,  # noqa: F401  (fixture)
    slurm_env,
    submit,
    submit_and_wait,
    wait_for_job,
)

SLURM_DIR = REPO_ROOT / "scripts" / "slurm"
SBATCH_FILES = sorted(SLURM_DIR.glob("*.sbatch"))
SHELL_FILES = SBATCH_FILES + sorted(SLURM_DIR.glob("*.sh"))
FIXTURES = REPO_ROOT / "tests" / "fixtures"

PROBE_JOB = """#!/usr/bin/env bash
#SBATCH --job-name=probe
#SBATCH -N1 -n2
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail
export NPROC_PER_NODE="$SLURM_NTASKS"
srun --nodes=1 --ntasks=1 scripts/slurm/launch.sh
"""


def test_slurm_scripts_parse():
    assert len(SBATCH_FILES) >= 3 and len(SHELL_FILES) >= 5
    for path in SHELL_FILES:
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"{path.name}: {result.stderr}"


@pytest.mark.parametrize("path", SBATCH_FILES, ids=lambda p: p.name)
def test_sbatch_files_requeue_on_usr1_through_launch_sh(path):
    text = path.read_text()
    assert "#SBATCH --signal=USR1@" in text
    assert "#SBATCH --requeue" in text
    assert "#SBATCH --open-mode=append" in text  # a requeued run appends to the same log
    assert "scripts/slurm/launch.sh" in text and "srun" in text


def test_launch_sh_outside_slurm_fails_fast():
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run(["bash", str(SLURM_DIR / "launch.sh")], capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert "srun" in result.stderr


def probe_env(out_dir: Path, **extra) -> dict:
    return {"LAUNCH_MODULE": "slurm_probe", "PYTHONPATH": str(FIXTURES), "PROBE_OUT_DIR": str(out_dir), **extra}


def read_probe(out_dir: Path, run: int) -> list:
    return [json.loads((out_dir / f"run{run}_rank{rank}.json").read_text()) for rank in range(2)]


def test_two_ranks_rendezvous_through_launch_sh(slurm_cluster, tmp_path):  # noqa: F811
    job_file = tmp_path / "probe.sbatch"
    job_file.write_text(PROBE_JOB)
    rc, log = submit_and_wait(job_file, probe_env(tmp_path), timeout_s=120, log_dir=tmp_path)
    assert rc == 0, log
    records = read_probe(tmp_path, run=0)
    job_id = records[0]["slurm_job_id"]
    assert [r["rank"] for r in records] == [0, 1]
    assert all(r["world_size"] == 2 and r["all_reduce_sum"] == 3.0 for r in records)
    assert {r["master_port"] for r in records} == {10000 + int(job_id) % 50000}
    assert {r["master_addr"] for r in records} == {subprocess.check_output(["hostname", "-s"], text=True).strip()}
    assert f"== launch.sh | job {job_id}" in log and "2 processes" in log


def wait_for_files(paths, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"timed out waiting for {[str(p) for p in paths]}"
        time.sleep(0.2)


def test_usr1_reaches_each_rank_once_and_requeues(slurm_cluster, tmp_path):  # noqa: F811
    """What --signal=USR1@180 does before the time limit, sent now with scancel: every rank gets SIGUSR1
    once, torchrun survives and exits cleanly after them, node 0 requeues, the restart runs to the end."""
    job_file = tmp_path / "probe.sbatch"
    job_file.write_text(PROBE_JOB)
    env = slurm_env(probe_env(tmp_path, PROBE_WAIT_FOR_USR1="1"))
    job_id = submit(job_file, env, tmp_path / "job.log")
    wait_for_files([tmp_path / f"ready_rank{rank}" for rank in range(2)], timeout_s=90)
    subprocess.run(["scancel", "--signal=USR1", job_id], env=env, check=True)
    wait_for_files([tmp_path / f"run0_rank{rank}.json" for rank in range(2)], timeout_s=30)
    deadline = time.monotonic() + 30
    while job_state(job_id, env)[0] != "PENDING":  # Slurm holds a requeued job for about two minutes
        assert time.monotonic() < deadline, "the job was not requeued"
        time.sleep(0.2)
    # start the restart early, but only after the first run has fully ended: slurmd refuses a relaunch
    # that comes within moments of the requeue's kill ("Job N already killed, do not launch batch job")
    deadline = time.monotonic() + 60
    while subprocess.run(["pgrep", "-f", "slurm_probe"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the first run's ranks did not exit"
        time.sleep(0.5)
    time.sleep(5)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, check=True)
    state, exit_code = wait_for_job(job_id, env, timeout_s=90)
    log = (tmp_path / "job.log").read_text()
    assert (state, exit_code) == ("COMPLETED", 0), log
    assert [r["usr1_received"] for r in read_probe(tmp_path, run=0)] == [1, 1]
    assert [r["restart"] for r in read_probe(tmp_path, run=1)] == [1, 1]
    assert "SIGUSR1 received" in log and f"requeueing job {job_id}" in log
    assert "torchrun exited with status 0" in log and "restart 1" in log
