#!/usr/bin/env python3
"""A thin wrapper: the command is router_upcycling.commands.preprocess (see --help)."""
import sys

from router_upcycling.commands.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
