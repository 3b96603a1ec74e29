#!/usr/bin/env python3
"""A thin wrapper: the command is router_upcycling.commands.compare_results (see --help)."""
import sys

from router_upcycling.commands.compare_results import main

if __name__ == "__main__":
    sys.exit(main())
