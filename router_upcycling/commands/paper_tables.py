"""Assemble the paper's Tables 1-4 from the runs of tools/paper_matrix.py, beside the paper's numbers.

    python tools/paper_tables.py --output-root /ckpt/paper --output paper-tables

Writes OUTPUT/tables.md (rows = runs, columns = the ten tasks and the group averages, each cell
"ours / paper (ours - paper)") and OUTPUT/tableN_loss.png (training and validation loss of the
table's runs against training tokens). Runs without results are empty rows.
"""
import argparse
import os
import sys

from router_upcycling.cli import OneLineErrorParser, user_errors
from router_upcycling.errors import UserError
from router_upcycling.outputs import staged_output


def main(argv=None) -> int:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-root", required=True, help="the --output-root of tools/paper_matrix.py (ROOT/NAME/results.json ...)")
    parser.add_argument("--output", required=True, help="folder to write tables.md and the PNGs into (refuses an existing one without --force)")
    parser.add_argument("--force", action="store_true", help="replace --output if it exists")
    args = parser.parse_args(argv)
    with user_errors():
        if not os.path.isdir(args.output_root):
            raise UserError(f"--output-root {args.output_root}: not a folder")
        from router_upcycling.paper.tables import write_tables

        with staged_output(args.output, args.force) as staging:
            written = write_tables(args.output_root, staging)
        print(f"wrote {', '.join(os.path.join(args.output, name) for name in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
