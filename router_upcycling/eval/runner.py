"""Run the suite through lm-eval's Python API (`--model hf` semantics) and collect the scores.

Prompts, filters and metrics are lm-eval's own; only the data source changes offline (see
router_upcycling.eval.tasks). The model is loaded by lm-eval's HFLM with trust_remote_code, so
stock Qwen2 / Qwen2-MoE folders and our remote-code `mor` exports all load.
"""
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from router_upcycling.eval.report import group_scores
from router_upcycling.files import read_json_object
from router_upcycling.outputs import write_text_atomic
from router_upcycling.hf.loading import experts_kwargs, usable_device
from router_upcycling.eval.tasks import OUR_TASKS_DIR, EvalError, SuiteTask, write_offline_overrides

MC_METRICS = ("acc", "acc_norm")
GENERATIVE_METRIC = "exact_match"


@dataclass
class EvalSettings:
    """Options of one run (recorded in results.json under "settings").

    mc_metric: metric reported for multiple-choice tasks; tasks without acc_norm (Winogrande,
        BoolQ, COPA) report acc either way. Generative tasks (NQ, TriviaQA) report exact_match.
    gen_max_tokens: lm-eval's max_gen_toks for the generative tasks (they also stop at newline,
        period and comma).
    """

    tasks: List[str]
    data_dir: Optional[str] = None
    num_fewshot: int = 0
    limit: Optional[int] = None
    batch_size: Union[int, str] = 8
    device: Optional[str] = None
    dtype: str = "auto"
    mc_metric: str = "acc_norm"
    gen_max_tokens: int = 32
    trust_remote_code: bool = True
    seed: int = 1234


def check_model_dir(model_dir: str) -> None:
    if not Path(model_dir, "config.json").is_file():
        raise EvalError(f"not a Hugging Face model folder (no config.json): {model_dir}")
    read_json_object(str(Path(model_dir, "config.json")), EvalError)


def build_task_manager(tasks: Sequence[SuiteTask], settings: EvalSettings, workdir: Path):
    """An lm-eval TaskManager that knows our tasks: the mirror overrides offline, else the hub tasks plus ours."""
    from lm_eval.tasks import TaskManager

    if settings.data_dir is None:
        return TaskManager(include_path=str(OUR_TASKS_DIR))
    write_offline_overrides(tasks, Path(settings.data_dir), settings.num_fewshot, workdir)
    # The overrides include the built-in YAMLs by absolute path, so lm-eval's 15k-task index is not needed.
    return TaskManager(include_path=str(workdir), include_defaults=False)


def pick_metric(task_results: dict, mc_metric: str) -> str:
    """The "metric,filter" key to report: exact_match, else mc_metric, else acc."""
    keys = [key for key in task_results if "," in key and "_stderr," not in key]
    for metric in (GENERATIVE_METRIC, mc_metric, "acc"):
        for key in keys:
            if key.split(",")[0] == metric:
                return key
    raise EvalError(f"lm-eval returned none of exact_match/{mc_metric}/acc; got {keys}")


def task_entry(task_results: dict, n_samples: int, mc_metric: str) -> dict:
    """results.json entry of one task: metric, score in percent, number of scored rows, all metrics."""
    metric = pick_metric(task_results, mc_metric)
    all_metrics = {key: value for key, value in task_results.items() if "," in key}
    return {"metric": metric, "score": 100.0 * task_results[metric], "n": n_samples, "all": all_metrics}


def run_suite(model_dir: str, tasks: Sequence[SuiteTask], settings: EvalSettings) -> dict:
    """Evaluate model_dir on tasks; returns the results.json content."""
    import lm_eval

    check_model_dir(model_dir)
    device = usable_device(settings.device)
    if settings.mc_metric not in MC_METRICS:
        raise EvalError(f"--mc-metric must be one of {MC_METRICS}, got {settings.mc_metric!r}")
    with tempfile.TemporaryDirectory(prefix="ru_eval_tasks_") as workdir:
        task_manager = build_task_manager(tasks, settings, Path(workdir))
        output = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": model_dir, "trust_remote_code": settings.trust_remote_code, "dtype": settings.dtype,
                        **experts_kwargs(device)},
            tasks=[task.lm_eval_task for task in tasks],
            num_fewshot=settings.num_fewshot,
            batch_size=settings.batch_size,
            device=device,
            limit=settings.limit,
            gen_kwargs={"max_gen_toks": settings.gen_max_tokens},
            task_manager=task_manager,
            log_samples=False,
            random_seed=settings.seed,
            numpy_random_seed=settings.seed,
            torch_random_seed=settings.seed,
            fewshot_random_seed=settings.seed,
        )
    missing = [task.key for task in tasks if task.lm_eval_task not in output["results"]]
    if missing:
        raise EvalError(f"lm-eval returned no results for {missing}")
    entries: Dict[str, dict] = {
        task.key: task_entry(output["results"][task.lm_eval_task], output["n-samples"][task.lm_eval_task]["effective"], settings.mc_metric)
        for task in tasks
    }
    return {
        "model": model_dir,
        "tasks": entries,
        "groups": group_scores({key: entry["score"] for key, entry in entries.items()}),
        "lm_eval_version": lm_eval.__version__,
        "settings": asdict(settings),
    }


def write_json_atomic(data: dict, path: str) -> None:
    """Write to a temporary file beside path, then rename, so an interrupted run leaves nothing half-written."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
