"""Run the paper's experiment matrix (Tables 1-4) on Slurm: one dependency chain per run,
upcycle -> train -> export -> eval and routing analysis, resumed where it stopped.

    python tools/paper_matrix.py --runs all --dry-run                      # the plan; needs no paths
    python tools/paper_matrix.py --runs mor vanilla \\
        --dense-model Qwen1.5-0.5B=/models/Qwen1.5-0.5B --calib-data /data/calib.jsonl \\
        --data-path /data/corpus_text_document --output-root /ckpt/paper --eval-data-dir /data/eval-mirror \\
        --routing-domain math=/data/dom/math.jsonl --routing-domain code=/data/dom/code.jsonl

Prints one line per run: its name, then each stage as done, queued(JOB), running(JOB) or todo (a dry
run's "would submit"). Rerun the same command to go on: stages that are done, queued or running are
left alone; a job that ended without finishing its stage is submitted again. Recipes: configs/paper/;
tables: tools/paper_tables.py.
"""
import argparse
import shlex
import sys

from router_upcycling.cli import OneLineErrorParser, user_errors
from router_upcycling.paper import slurm
from router_upcycling.paper.inputs import check_inputs, inputs_from_arguments
from router_upcycling.paper.matrix import RunLayout, advance_run, check_started_with, show_commands, status_line
from router_upcycling.paper.recipes import RUN_NAMES, RecipeError, check_run_names, load_recipe


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, metavar="NAME",
                        help=f"'all' or run names (configs/paper/NAME.yaml): {', '.join(RUN_NAMES)}")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (and, with --show-commands, the sbatch "
                        "lines); submit and write nothing. Paths not given show as <placeholders>")
    parser.add_argument("--show-commands", action="store_true", help="with --dry-run: also print the sbatch command of "
                        "every stage it would submit")
    paths = parser.add_argument_group("inputs and outputs (all required unless --dry-run)")
    paths.add_argument("--dense-model", action="append", default=[], metavar="BACKBONE=FOLDER",
                       help="the dense Hugging Face folder of a backbone the runs name (Qwen1.5-0.5B; Qwen1.5-1.8B for "
                       "Table 2); repeat per backbone")
    paths.add_argument("--calib-data", nargs="+", default=[], metavar="PATH",
                       help="calibration text for the Mixture-of-Routers average keys (as upcycle's --calib-data)")
    paths.add_argument("--data-path", nargs="+", default=[], metavar="PREFIX",
                       help="indexed training data: a prefix (PREFIX.bin/.idx from tools/preprocess_data.py) or a "
                       "weighted blend '0.3 A 0.7 B' (as training's --data-path)")
    paths.add_argument("--output-root", help="folder of the runs: ROOT/NAME/{upcycled,train,hf,results.json,routing,logs}")
    paths.add_argument("--eval-data-dir", help="offline evaluation mirror (tools/mirror_eval_data.py)")
    paths.add_argument("--routing-domain", action="append", default=[], metavar="NAME=FILE",
                       help="texts of one domain for the routing analysis (paper Fig. 5: math, code, book, arxiv, wiki); repeat")
    sizes = parser.add_argument_group("changing the recipes (e.g. a toy run on CPU)")
    sizes.add_argument("--profile", help="settings merged over every recipe: a name under configs/paper/profiles/ "
                       "(toy_cpu: tiny sizes on CPU) or a YAML file")
    sizes.add_argument("--train-iters", type=int, help="train this many steps instead of the recipe's")
    sizes.add_argument("--set", action="append", default=[], metavar="SECTION.FLAG=VALUE",
                       help="override one flag of a stage (SECTION: upcycle, train, export, eval, routing), "
                       "e.g. --set train.lr=1e-4 --set eval.limit=100; repeat")
    sizes.add_argument("--sbatch-args", default="", help="extra sbatch options for every job, e.g. "
                       "\"--partition=gpu --account=myproject\"")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with user_errors():
        if args.train_iters is not None and args.train_iters < 1:
            raise RecipeError(f"--train-iters must be at least 1, got {args.train_iters}")
        names = check_run_names(args.runs)
        overrides = [*args.set, *([f"train.train-iters={args.train_iters}"] if args.train_iters is not None else [])]
        recipes = [load_recipe(name, args.profile, overrides) for name in names]
        inputs = inputs_from_arguments(args.dense_model, args.calib_data, args.data_path, args.output_root,
                                       args.eval_data_dir, args.routing_domain)
        check_inputs(inputs, recipes, required=not args.dry_run)
        recorded = [job for recipe in recipes if inputs.output_root
                    for job in RunLayout(inputs.output_root, recipe.name).recorded_jobs().values()]
        active = slurm.active_jobs(recorded)
        for recipe in recipes:
            check_started_with(recipe, inputs, active, args.dry_run)
        sbatch_args = shlex.split(args.sbatch_args)
        width = max(map(len, names))
        for recipe in recipes:
            states = advance_run(recipe, inputs, active, sbatch_args, args.dry_run,
                                 note=lambda text: print(f"note: {text}", file=sys.stderr))
            print(status_line(recipe.name, states, width), flush=True)
            if args.show_commands:
                for line in show_commands(recipe, inputs, states, sbatch_args):
                    print(f"    {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
