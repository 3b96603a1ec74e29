"""A real one-node Slurm cluster for tests: a pytest fixture and job helpers.

Use it from a test module with

    from slurm_cluster import slurm_cluster, submit_and_wait  # noqa: F401  (the fixture is used by name)

The fixture runs scripts/slurm/local_cluster.sh start (which installs slurm-wlm and munge with
apt-get when missing, as root) and stops the daemons at the end of the module if it started them.
When the cluster cannot be started the tests that use it are skipped with the reason, loudly
(the suite runs with -ra).
"""
import contextlib
import fcntl
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO_ROOT / "scripts" / "slurm" / "local_cluster.sh"
STATE_DIR = Path(os.environ.get("LOCAL_SLURM_DIR", "/tmp/router_upcycling_slurm"))
SLURM_CONF = STATE_DIR / "slurm.conf"
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
}


class SlurmJobTimeout(RuntimeError):
    pass


def slurm_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment for Slurm clients and jobs: this process's, pointed at the local cluster."""
    env = dict(os.environ, SLURM_CONF=str(SLURM_CONF))
    env.update(extra or {})
    return env


def _run_cluster_script(action: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER_SCRIPT), action], capture_output=True, text=True, timeout=600)


@contextlib.contextmanager
def _cluster_to_ourselves():
    """The one-node cluster serves one test module at a time, also across pytest-xdist workers (`make test` runs
    two): a module holds this lock from start to stop, so its jobs never queue behind another module's and no
    module stops the cluster under another."""
    with open(os.path.join(tempfile.gettempdir(), "router_upcycling_slurm.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


@pytest.fixture(scope="module")
def slurm_cluster():
    """Start (or reuse) the local cluster; yields SLURM_CONF's path. Skips, with the reason, when it cannot."""
    with _cluster_to_ourselves():
        yield from _started_cluster()


def _started_cluster():
    already_running = _run_cluster_script("status").returncode == 0
    if not already_running:
        started = time.monotonic()
        result = _run_cluster_script("start")
        if result.returncode != 0:
            _run_cluster_script("stop")  # whatever did start
            reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
            message = f"SLURM TESTS SKIPPED: could not start a local Slurm cluster ({CLUSTER_SCRIPT.name} start): {reason}"
            print(message, file=sys.stderr)
            pytest.skip(message)
        print(f"local Slurm cluster started in {time.monotonic() - started:.1f}s", file=sys.stderr)
    yield SLURM_CONF
    if not already_running:
        _run_cluster_script("stop")


def job_state(job_id: str, env: Dict[str, str]) -> Tuple[str, int]:
    """(JobState, exit code) of a job, from `scontrol show job`."""
    out = subprocess.run(
        ["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True, env=env, check=True
    ).stdout
    state = re.search(r"\bJobState=(\S+)", out).group(1)
    exit_code = int(re.search(r"\bExitCode=(\d+):", out).group(1))
    return state, exit_code


def wait_for_job(job_id: str, env: Dict[str, str], timeout_s: float) -> Tuple[str, int]:
    """Poll until the job ends (a requeued job is followed through its restarts); cancel it on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state, exit_code = job_state(job_id, env)
        if state in TERMINAL_STATES:
            return state, exit_code
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], env=env)
    raise SlurmJobTimeout(f"Slurm job {job_id} did not finish within {timeout_s:.0f}s")


def submit(sbatch_file, env: Dict[str, str], log_path, args=(), cwd=REPO_ROOT) -> str:
    """sbatch a job from cwd (the repository root by default) with its log at log_path; returns the job id."""
    result = subprocess.run(
        ["sbatch", "--parsable", f"--output={log_path}", str(sbatch_file), *args],
        capture_output=True, text=True, env=slurm_env(env), cwd=str(cwd),
    )
    if result.returncode != 0:
        raise RuntimeError(f"sbatch {sbatch_file} failed: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def submit_and_wait(
    sbatch_file, env: Optional[Dict[str, str]] = None, args=(), timeout_s: float = 300, log_dir=None
) -> Tuple[int, str]:
    """Submit sbatch_file from the repository root, wait for it to end; returns (exit code, log text).

    The exit code is non-zero whenever the job did not end COMPLETED.
    env adds to this process's environment (the job inherits it, as sbatch's --export=ALL does);
    args go to the batch script. The log is written to log_dir (default: the cluster's state dir).
    """
    log_dir = Path(log_dir or STATE_DIR / "logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{Path(sbatch_file).stem}-{time.time_ns()}.log"
    full_env = slurm_env(env)
    job_id = submit(sbatch_file, full_env, log_path, args)
    state, exit_code = wait_for_job(job_id, full_env, timeout_s)
    if state != "COMPLETED" and exit_code == 0:
        exit_code = 1  # cancelled or killed by a signal: Slurm reports exit code 0
    return exit_code, log_path.read_text() if log_path.exists() else ""
