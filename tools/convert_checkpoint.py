#!/usr/bin/env python3
"""Convert checkpoints between Hugging Face and Megatron: upcycle, verify, export (see --help).

A thin wrapper: the command is router_upcycling.commands.convert (installed as `router-upcycling-convert`).
"""
import sys

from router_upcycling.commands.convert import build_parser, main  # noqa: F401  (build_parser: for tests and docs)

if __name__ == "__main__":
    sys.exit(main())
