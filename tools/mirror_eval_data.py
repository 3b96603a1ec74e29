#!/usr/bin/env python3
"""A thin wrapper: the command is router_upcycling.commands.mirror_eval_data (see --help)."""
import sys

from router_upcycling.commands.mirror_eval_data import main

if __name__ == "__main__":
    sys.exit(main())
