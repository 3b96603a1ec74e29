"""Compare results.json files of router_upcycling.eval side by side: markdown table and grouped bar chart.

    python tools/compare_results.py vanilla.json router_upcycling.json --output chart.png
"""
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from router_upcycling.cli import OneLineErrorParser, run_command
from router_upcycling.eval.report import GROUP_LABELS, load_results, markdown_table, paper_reference_columns, result_column
from router_upcycling.eval.tasks import SUITE, EvalError
from router_upcycling.outputs import refuse_existing, staged_file

Column = Tuple[str, Dict[str, Optional[float]]]


def column_names(paths: Sequence[str], names: Optional[str]) -> List[str]:
    """--names if given (one per file), else the file names without .json."""
    if names is None:
        return [Path(path).stem for path in paths]
    chosen = [name.strip() for name in names.split(",")]
    if len(chosen) != len(paths):
        raise EvalError(f"--names has {len(chosen)} names for {len(paths)} results files")
    return chosen


def save_bar_chart(columns: Sequence[Column], path: str) -> None:
    """Grouped bars: one group per task and per average, one bar per column (missing scores left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(t.key, t.label) for t in SUITE] + list(GROUP_LABELS.items())
    width = 0.8 / len(columns)
    figure, axes = plt.subplots(figsize=(max(10, 1.1 * len(rows)), 4.5))
    for index, (name, scores) in enumerate(columns):
        xs = [row for row, (key, _) in enumerate(rows) if scores.get(key) is not None]
        heights = [scores[rows[row][0]] for row in xs]
        axes.bar([x - 0.4 + width * (index + 0.5) for x in xs], heights, width, label=name)
    axes.set_xticks(range(len(rows)), [label for _, label in rows], rotation=30, ha="right")
    axes.set_ylabel("score (%)")
    axes.legend(fontsize="small")
    figure.tight_layout()
    try:
        with staged_file(path) as tmp:
            figure.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(figure)


def main(argv: Optional[List[str]] = None) -> int:
    parser = OneLineErrorParser(description="Side-by-side markdown table (paper layout) and grouped bar chart of results.json files.")
    parser.add_argument("results", nargs="+", help="results.json files written by python -m router_upcycling.eval")
    parser.add_argument("--names", help="comma-separated column names, one per file (default: file names)")
    parser.add_argument("--output", help="save a grouped bar chart PNG here (refuses to overwrite without --force)")
    parser.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    parser.add_argument("--no-paper", action="store_true", help="leave out the paper's 8x0.5B reference columns")
    args = parser.parse_args(argv)
    return run_command(lambda: run(args))


def run(args) -> None:
    if args.output:
        refuse_existing(args.output, args.force)
        parent = Path(args.output).resolve().parent
        if not parent.is_dir():
            what = "is a file" if parent.exists() else "does not exist"
            raise EvalError(f"--output {args.output}: its folder {parent} {what}")
        if Path(args.output).suffix.lower() != ".png":
            raise EvalError(f"--output {args.output}: the chart is a PNG; name it NAME.png")
    names = column_names(args.results, args.names)
    columns: List[Column] = [(name, result_column(load_results(path))) for name, path in zip(names, args.results)]
    if not args.no_paper:
        columns += paper_reference_columns()
    print(markdown_table(columns))
    if args.output:
        save_bar_chart(columns, args.output)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    sys.exit(main())
