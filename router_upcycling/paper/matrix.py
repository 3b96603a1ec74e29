"""Each run of the matrix as a Slurm dependency chain, resumed where it stopped.

Stages and the durable marker that says each is done (under ROOT/NAME/):

    upcycle  upcycled/latest_checkpointed_iteration.txt      (from-scratch runs have no upcycle stage)
    train    train/latest_checkpointed_iteration.txt at train-iters
    export   hf/config.json                                  (written to a temporary folder, then renamed)
    eval     results.json
    routing  routing/routing.json

train waits for upcycle, export for train, eval and routing for export (`afterok`). A stage is submitted
when it is not done and has no job that is still queued or running (squeue); a job that ended without
its marker is submitted again, and so is every later stage, whose pending jobs waited on the dead one.
ROOT/NAME/jobs.json records the job of each stage; ROOT/NAME/recipe.yaml the settings of the last submission
(a rerun may change the settings of stages that have not started, no others); ROOT/NAME/train.yaml the
training flags (`--config`).
"""
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import yaml

from router_upcycling.checkpoint_folder import read_tracker
from router_upcycling.outputs import write_text_atomic
from router_upcycling.paper import slurm
from router_upcycling.paper.inputs import Inputs, MatrixError, placeholder
from router_upcycling.paper.recipes import Recipe, flag_argv
from router_upcycling.resources import resource_path, resource_root

TRAIN_SBATCH = "scripts/slurm/paper_train.sbatch"  # relative to resource_root(), where jobs are submitted from
STAGE_SBATCH = "scripts/slurm/paper_stage.sbatch"
CONVERT = "router_upcycling.commands.convert"
AFTER = {"train": "upcycle", "export": "train", "eval": "export", "routing": "export"}


def submit_dir() -> str:
    """Where jobs are submitted from: the folder holding scripts/slurm/ (the sbatch files call launch.sh relative to it)."""
    resource_path(TRAIN_SBATCH)
    return str(resource_root())


class RunLayout:
    """Where a run's stages write, under ROOT/NAME."""

    def __init__(self, root: str, name: str) -> None:
        self.dir = Path(root) / name
        self.upcycled = self.dir / "upcycled"
        self.train = self.dir / "train"
        self.hf = self.dir / "hf"
        self.results = self.dir / "results.json"
        self.routing = self.dir / "routing"
        self.logs = self.dir / "logs"
        self.jobs = self.dir / "jobs.json"
        self.recipe = self.dir / "recipe.yaml"
        self.train_config = self.dir / "train.yaml"
        self.metrics = self.train / "metrics.jsonl"

    def done(self, stage: str, train_iters: int) -> bool:
        """Whether the stage's durable marker is there."""
        if stage == "upcycle":
            return read_tracker(str(self.upcycled)) is not None
        if stage == "train":
            iteration = read_tracker(str(self.train))
            return iteration is not None and iteration.isdigit() and int(iteration) >= train_iters
        marker = {"export": self.hf / "config.json", "eval": self.results, "routing": self.routing / "routing.json"}[stage]
        return marker.is_file()

    def recorded_jobs(self) -> Dict[str, str]:
        return json.loads(self.jobs.read_text()) if self.jobs.is_file() else {}

    def record_job(self, stage: str, job_id: str) -> None:
        write_text_atomic(str(self.jobs), json.dumps({**self.recorded_jobs(), stage: job_id}, indent=2) + "\n")


@dataclass(frozen=True)
class StageJob:
    """One stage as an sbatch call: sbatch OPTIONS SCRIPT ARGS, with ENV added to the job's environment."""

    stage: str
    script: str
    args: List[str]
    options: List[str]
    env: Dict[str, str]

    def sbatch_options(self, dependency: Optional[str] = None) -> List[str]:
        return [*self.options, *([f"--dependency=afterok:{dependency}"] if dependency else [])]

    def command(self, dependency: Optional[str] = None) -> List[str]:
        return ["sbatch", *self.sbatch_options(dependency), self.script, *self.args]


def stage_jobs(recipe: Recipe, layout: RunLayout, inputs: Inputs, sbatch_args: List[str]) -> Dict[str, StageJob]:
    """The sbatch call of every stage of the run."""
    dense = inputs.dense(recipe.backbone)
    data = placeholder(inputs.data_path, "data-path")

    def job(stage: str, script: str, args: List[str], env: Optional[Dict[str, str]] = None) -> StageJob:
        options = [f"--job-name=paper-{recipe.name}-{stage}", f"--output={layout.logs}/{stage}-%j.log",
                   "--kill-on-invalid-dep=yes", *recipe.slurm[stage], *sbatch_args]
        return StageJob(stage, script, args, options, env or {})

    jobs = {}
    if recipe.upcycle is not None:
        calib = ["--calib-data", *placeholder(inputs.calib_data, "calib-data")] if recipe.needs_calibration else []
        jobs["upcycle"] = job("upcycle", STAGE_SBATCH, [CONVERT, "upcycle", "--hf-model", dense, "--output", str(layout.upcycled),
                                                        *calib, *flag_argv(recipe.upcycle)])
    source = ["--model-config", dense] if recipe.upcycle is None else ["--pretrained-checkpoint", str(layout.upcycled)]
    processes = {"NPROC_PER_NODE": str(recipe.train_processes_per_node)} if recipe.train_processes_per_node else {}
    jobs["train"] = job("train", TRAIN_SBATCH, ["--config", str(layout.train_config), *source, "--data-path", *data,
                                                "--load", str(layout.train), "--save", str(layout.train)], processes)
    jobs["export"] = job("export", STAGE_SBATCH, [CONVERT, "export", "--checkpoint", str(layout.train), "--output", str(layout.hf),
                                                  "--iteration", str(recipe.train_iters), *flag_argv(recipe.export)])
    jobs["eval"] = job("eval", STAGE_SBATCH, ["router_upcycling.eval", "--model", str(layout.hf), "--data-dir",
                                              inputs.eval_data_dir or "<eval-data-dir>", "--output", str(layout.results),
                                              *flag_argv(recipe.eval)])
    domains = [word for spec in placeholder(inputs.routing_domains, "NAME=FILE") for word in ("--domain", spec)]
    jobs["routing"] = job("routing", STAGE_SBATCH, ["router_upcycling.analyze", "routing", "--model", str(layout.hf), *domains,
                                                    "--output", str(layout.routing), *flag_argv(recipe.routing)])
    return jobs


@dataclass
class StageState:
    """A stage as the status line shows it: done, queued(ID), running(ID), or todo (to be submitted)."""

    stage: str
    state: str
    job_id: Optional[str] = None
    replaces: Optional[str] = None   # a job of this stage that is still pending but can no longer start

    def __str__(self) -> str:
        return f"{self.stage}:{self.state}" + (f"({self.job_id})" if self.job_id else "")


def plan_run(recipe: Recipe, layout: Optional[RunLayout], active: Dict[str, slurm.JobStatus]) -> List[StageState]:
    """Each stage's state from the markers and the recorded jobs (all todo without an output root)."""
    recorded = layout.recorded_jobs() if layout else {}
    states: Dict[str, StageState] = {}
    for stage in recipe.stages:
        upstream = states.get(AFTER.get(stage, ""))
        status = active.get(recorded.get(stage, ""))
        if layout and layout.done(stage, recipe.train_iters):
            states[stage] = StageState(stage, "done")
        elif status and not status.stuck and not (upstream and upstream.state == "todo"):
            states[stage] = StageState(stage, status.word, status.job_id)
        else:
            states[stage] = StageState(stage, "todo", replaces=status.job_id if status else None)
    return list(states.values())


def run_settings(recipe: Recipe, inputs: Inputs) -> dict:
    """What ROOT/NAME/recipe.yaml records: the resolved recipe and the inputs the run reads."""
    return {"recipe": recipe.as_dict(), "inputs": inputs.as_dict(recipe)}


# what each stage's output depends on (keys of recipe.yaml), besides what the stages before it depend on
DEPENDS_ON = {
    "upcycle": ["recipe.backbone", "recipe.upcycle", "inputs.dense-model", "inputs.calib-data"],
    "train": ["recipe.backbone", "recipe.train", "inputs.dense-model", "inputs.data-path"],
    "export": ["recipe.export"],
    "eval": ["recipe.eval", "inputs.eval-data-dir"],
    "routing": ["recipe.routing", "inputs.routing-domains"],
}


def depends_on(stage: str) -> List[str]:
    """The recipe.yaml keys a stage's output depends on, through the stages before it."""
    before = depends_on(AFTER[stage]) if stage in AFTER else []
    return before + [key for key in DEPENDS_ON[stage] if key not in before]


def check_started_with(recipe: Recipe, inputs: Inputs, active: Dict[str, slurm.JobStatus], dry_run: bool) -> None:
    """Refuse settings that differ from those a started stage (done, queued, running, or training with a
    checkpoint) was submitted with; stages not started yet take the new ones. A dry run, which may leave the
    paths out, compares the recipe only."""
    layout = RunLayout(inputs.output_root, recipe.name) if inputs.output_root else None
    if layout is None or not layout.recipe.is_file():
        return
    before, now = yaml.safe_load(layout.recipe.read_text()), run_settings(recipe, inputs)
    for state in plan_run(recipe, layout, active):
        if state.state == "todo" and not (state.stage == "train" and read_tracker(str(layout.train))):
            continue
        for key in depends_on(state.stage):
            if dry_run and key.startswith("inputs."):
                continue
            old, new = _flat(_get(before, key), key), _flat(_get(now, key), key)
            changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            if changed:
                raise MatrixError(f"{layout.dir}: its {state.stage} stage started with other settings ({changed[0]}: "
                                  f"{old.get(changed[0])!r} -> {new.get(changed[0])!r}); rerun with those or use another --output-root")


def _get(tree: dict, key: str):
    for part in key.split("."):
        tree = (tree or {}).get(part)
    return tree


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}.{key}" if prefix else str(key)).items()}


def advance_run(recipe: Recipe, inputs: Inputs, active: Dict[str, slurm.JobStatus], sbatch_args: List[str],
                dry_run: bool, note: Callable[[str], None]) -> List[StageState]:
    """Submit the run's stages that are not done and have no live job, each after the stage it needs; returns
    the states to print. A dry run submits and writes nothing. Check the run folder first (check_started_with)."""
    layout = RunLayout(inputs.output_root, recipe.name) if inputs.output_root else None
    states = plan_run(recipe, layout, active)
    if dry_run or not any(state.state == "todo" for state in states):
        return states
    write_text_atomic(str(layout.recipe), yaml.safe_dump(run_settings(recipe, inputs), sort_keys=False))
    write_text_atomic(str(layout.train_config), yaml.safe_dump(recipe.train, sort_keys=False))
    layout.logs.mkdir(parents=True, exist_ok=True)
    jobs = stage_jobs(recipe, layout, inputs, sbatch_args)
    recorded = layout.recorded_jobs()
    by_stage = {state.stage: state for state in states}
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)}
    for state in states:
        if state.state != "todo":
            continue
        if state.replaces:
            slurm.cancel(state.replaces)
        elif recorded.get(state.stage):
            note(f"{recipe.name}: the {state.stage} job {recorded[state.stage]} has ended and its stage is not done "
                 f"(log: {layout.logs}/{state.stage}-{recorded[state.stage]}.log); submitting it again")
        upstream = by_stage.get(AFTER.get(state.stage, ""))
        job = jobs[state.stage]
        options = job.sbatch_options(upstream.job_id if upstream and upstream.state != "done" else None)
        state.job_id = slurm.submit(options, job.script, job.args, {**env, **job.env}, submit_dir())
        state.state = "queued"
        layout.record_job(state.stage, state.job_id)
    return states


def show_commands(recipe: Recipe, inputs: Inputs, states: List[StageState], sbatch_args: List[str]) -> List[str]:
    """The sbatch command line of each stage still to submit (for --show-commands)."""
    layout = RunLayout(inputs.output_root or "<output-root>", recipe.name)
    jobs = stage_jobs(recipe, layout, inputs, sbatch_args)
    by_stage = {state.stage: state for state in states}
    lines = []
    for state in states:
        if state.state == "todo":
            upstream = by_stage.get(AFTER.get(state.stage, ""))
            wait = f"<{upstream.stage} job>" if upstream and upstream.state == "todo" else upstream.job_id if upstream else None
            env = " ".join(f"{key}={value}" for key, value in jobs[state.stage].env.items())
            lines.append((env + " " if env else "") + shlex.join(jobs[state.stage].command(wait)))
    return lines


def status_line(name: str, states: List[StageState], width: int) -> str:
    return f"{name:<{width}}  " + " ".join(map(str, states))
