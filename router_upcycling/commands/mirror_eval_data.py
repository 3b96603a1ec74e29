"""Write the offline mirror of the evaluation data (run where the Hugging Face hub is reachable).

    python tools/mirror_eval_data.py --output eval_data
    python -m router_upcycling.eval --model MODEL --data-dir eval_data

Layout (shared with the runner, router_upcycling.eval.tasks): DIR/<hub dataset path>/<config or
"default">/<split>.jsonl, one hub row per line in the dataset's own fields. Every split the ten
tasks read is written: the scored split and, unless --eval-splits-only, the few-shot split.
"""
import sys
from pathlib import Path
from typing import List, Optional

from router_upcycling.cli import OneLineErrorParser, run_command
from router_upcycling.eval.tasks import MirrorFile, all_mirror_files, check_hub_reachable, resolve_tasks
from router_upcycling.outputs import refuse_existing, staged_output

NO_HUB_HINT = ("run it on a machine that reaches the hub and copy --output here; for a smoke test without the hub, "
               "router_upcycling.eval.sample_data.write_sample_mirror(DIR) writes made-up rows in the same layout")


def mirror_plan(tasks_spec: str, include_fewshot: bool) -> List[MirrorFile]:
    """The distinct files to write for the tasks in tasks_spec ('paper' or comma-separated keys)."""
    return all_mirror_files(resolve_tasks(tasks_spec), include_fewshot)


def write_mirror(files: List[MirrorFile], output: Path) -> None:
    """Download each split with `datasets` and write it as JSON lines under output."""
    import datasets
    from tqdm import tqdm

    for file in tqdm(files, desc="mirroring", unit="split"):
        rows = datasets.load_dataset(file.hub_path, file.config, split=file.split)
        path = output / file.relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        rows.to_json(str(path), lines=True, force_ascii=False)


def main(argv: Optional[List[str]] = None) -> int:
    parser = OneLineErrorParser(description="Mirror the evaluation datasets of "
                                "router_upcycling.eval as JSON lines for offline runs.")
    parser.add_argument("--output", required=True, help="mirror folder to create (refuses an existing one without --force)")
    parser.add_argument("--tasks", default="paper", help="'paper' (all ten, default) or comma-separated task keys")
    parser.add_argument("--eval-splits-only", action="store_true", help="skip the few-shot (training) splits: enough for --num-fewshot 0")
    parser.add_argument("--dry-run", action="store_true", help="print the files that would be written and exit")
    parser.add_argument("--force", action="store_true", help="replace an existing --output folder (after the new mirror is complete)")
    args = parser.parse_args(argv)
    return run_command(lambda: run(args))


def run(args) -> None:
    output = Path(args.output)
    if not args.dry_run:
        refuse_existing(str(output), args.force)
    files = mirror_plan(args.tasks, include_fewshot=not args.eval_splits_only)
    if args.dry_run:
        for file in files:
            print(f"{file.hub_path} [{file.config or 'default'}] {file.split} -> {output / file.relative_path}")
        return
    check_hub_reachable("mirroring the evaluation data", hint=NO_HUB_HINT)  # datasets would retry, then a traceback
    with staged_output(str(output), args.force) as staging:
        write_mirror(files, Path(staging))
    print(f"wrote {len(files)} files under {output}")


if __name__ == "__main__":
    sys.exit(main())
