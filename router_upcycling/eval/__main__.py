"""`python -m router_upcycling.eval`: the paper's ten tasks with lm-eval, a markdown table and results.json."""
import argparse
import sys
from pathlib import Path
from typing import List, Optional, Union

from router_upcycling.cli import OneLineErrorParser, run_command

from router_upcycling.eval.report import markdown_table, paper_reference_columns, result_column
from router_upcycling.eval.runner import MC_METRICS, EvalSettings, check_model_dir, run_suite, write_json_atomic
from router_upcycling.eval.tasks import SUITE, EvalError, check_hub_reachable, check_mirror, resolve_tasks
from router_upcycling.hf.loading import check_vocabulary
from router_upcycling.outputs import refuse_existing


def batch_size_arg(value: str) -> Union[int, str]:
    if value == "auto" or value.startswith("auto:"):
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="python -m router_upcycling.eval",
        description="Evaluate a Hugging Face model folder (dense Qwen2, stock Qwen2-MoE or a `mor` export) on the "
        "paper's ten tasks with lm-evaluation-harness (its own prompts, filters and metrics; OBQA-fact is our "
        "task YAML), print a markdown table beside the paper's 8x0.5B numbers and write results.json.",
        epilog="Tasks (keys): " + ", ".join(f"{t.key} ({t.label}, lm-eval task {t.lm_eval_task})" for t in SUITE)
        + ". Groups average the tasks that were run: Understanding = OBQA, OBQA-fact; Reasoning = ARC-C, ARC-E, "
        "HellaSwag, Winogrande; Knowledge = BoolQ, COPA, NQ, TriviaQA; Average = all run tasks.",
    )
    parser.add_argument("--model", required=True, help="Hugging Face model folder (config.json, weights, tokenizer)")
    parser.add_argument("--tasks", default="paper", help="'paper' (all ten, default) or comma-separated task keys or lm-eval task names")
    parser.add_argument("--data-dir", help="offline mirror written by tools/mirror_eval_data.py: each task reads "
                        "DIR/<hub dataset path>/<config or 'default'>/<split>.jsonl; without it lm-eval downloads from the hub")
    parser.add_argument("--output", help="write results.json here (refuses to overwrite without --force)")
    parser.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    parser.add_argument("--batch-size", type=batch_size_arg, default=8, help="lm-eval batch size: an integer or 'auto' (default 8)")
    parser.add_argument("--limit", type=int, help="score only the first N rows of each task (for smoke tests; not comparable to the paper)")
    parser.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples per prompt (default 0, the paper's setting); "
                        "offline, >0 also needs each task's few-shot split (its training split) in the mirror")
    parser.add_argument("--device", help="torch device, e.g. cuda:0 or cpu (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default="auto", help="model dtype: auto (the folder's torch_dtype), float32, bfloat16, float16")
    parser.add_argument("--mc-metric", choices=MC_METRICS, default="acc_norm",
                        help="metric reported for multiple-choice tasks (default acc_norm); Winogrande, BoolQ and COPA "
                        "have only acc; NQ and TriviaQA report exact_match. results.json keeps every metric under 'all'")
    parser.add_argument("--gen-max-tokens", type=int, default=32,
                        help="max new tokens for NQ and TriviaQA (lm-eval's max_gen_toks; they also stop at newline, '.' and ','); default 32")
    parser.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=True,
                        help="let the folder's own modeling code run (needed for `mor` exports; default on)")
    parser.add_argument("--seed", type=int, default=1234, help="seed for lm-eval's python, numpy, torch and few-shot sampling")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args))


def check_numbers(args) -> None:
    """The numbers and names lm-eval would otherwise take (or fail on) only after loading the model."""
    from router_upcycling.eval.tasks import EvalError

    if isinstance(args.batch_size, int) and args.batch_size < 1:
        raise EvalError(f"--batch-size must be at least 1 (or 'auto'), got {args.batch_size}")
    for flag, value, least in (("--limit", args.limit, 1), ("--num-fewshot", args.num_fewshot, 0),
                               ("--gen-max-tokens", args.gen_max_tokens, 1)):
        if value is not None and value < least:
            raise EvalError(f"{flag} must be at least {least}, got {value}")
    if args.dtype not in DTYPES:
        raise EvalError(f"--dtype {args.dtype!r} is not one of {', '.join(DTYPES)}")


DTYPES = ("auto", "float32", "bfloat16", "float16")


def run(args) -> None:
    check_numbers(args)
    tasks = resolve_tasks(args.tasks)
    check_model_dir(args.model)
    if args.output:
        refuse_existing(args.output, args.force)
        parent = Path(args.output).resolve().parent
        if parent.exists() and not parent.is_dir():
            raise EvalError(f"--output {args.output}: its parent {parent} is a file")
    if args.data_dir:
        check_mirror(Path(args.data_dir), tasks, args.num_fewshot)
    else:
        check_hub_reachable("evaluating without --data-dir")
    check_vocabulary(args.model, args.trust_remote_code)
    settings = EvalSettings(
        tasks=[task.key for task in tasks], data_dir=args.data_dir, num_fewshot=args.num_fewshot, limit=args.limit,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, mc_metric=args.mc_metric,
        gen_max_tokens=args.gen_max_tokens, trust_remote_code=args.trust_remote_code, seed=args.seed,
    )
    results = run_suite(args.model, tasks, settings)
    print(markdown_table([(args.model, result_column(results))] + paper_reference_columns()))
    if args.output:
        write_json_atomic(results, args.output)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    sys.exit(main())
