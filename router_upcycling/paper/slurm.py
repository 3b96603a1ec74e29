"""The Slurm client calls of the matrix: submit with sbatch, ask squeue which jobs are still queued or running."""
import getpass
import shutil
import subprocess
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

from router_upcycling.errors import UserError

# squeue states of a job that will still run (or is running); every other state has ended
QUEUED_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
RUNNING_STATES = {"RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING"}


class SlurmError(UserError):
    """sbatch or squeue is missing or refused a request."""


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: str    # squeue's state, e.g. PENDING
    reason: str   # squeue's reason, e.g. Dependency

    @property
    def word(self) -> str:
        """queued or running, as the matrix prints it."""
        return "running" if self.state in RUNNING_STATES else "queued"

    @property
    def stuck(self) -> bool:
        """Pending behind a job that failed: it can never start."""
        return self.reason == "DependencyNeverSatisfied"


def _run(command: List[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None) -> str:
    if shutil.which(command[0]) is None:
        raise SlurmError(f"{command[0]} not found: run this on a Slurm login node (or use --dry-run)")
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise SlurmError(f"{command[0]} failed: {message}")
    return result.stdout


def active_jobs(job_ids: Iterable[str]) -> Dict[str, JobStatus]:
    """The jobs among job_ids that are still queued or running (squeue lists only those by default)."""
    wanted = set(job_ids)
    if not wanted:
        return {}
    output = _run(["squeue", "--noheader", "--format=%i|%T|%r", f"--user={getpass.getuser()}"])
    statuses = {}
    for line in output.splitlines():
        job_id, state, reason = (line.split("|") + ["", ""])[:3]
        if job_id in wanted and (state in QUEUED_STATES or state in RUNNING_STATES):
            statuses[job_id] = JobStatus(job_id, state, reason)
    return statuses


def submit(options: List[str], script: str, args: List[str], env: Dict[str, str], cwd: str) -> str:
    """sbatch --parsable OPTIONS SCRIPT ARGS from cwd; returns the job id."""
    output = _run(["sbatch", "--parsable", *options, script, *args], env=env, cwd=cwd)
    return output.strip().split(";")[0]


def cancel(job_id: str) -> None:
    _run(["scancel", job_id])
