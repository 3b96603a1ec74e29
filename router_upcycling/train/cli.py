"""The command line of `python -m router_upcycling.train`: flags and files are checked first (no torch, no
megatron-core), the model's settings against the model, then the device; only then does training start."""
from typing import List, Optional

from router_upcycling.cli import setup_logging, user_errors
from router_upcycling.train.config import parse_args
from router_upcycling.train.source import resolve_model_source


def main(argv: Optional[List[str]] = None) -> None:
    setup_logging()
    with user_errors():
        config = parse_args(argv, on_this_machine=False)
        source = resolve_model_source(config)
        config = config.on_this_machine()
        from router_upcycling.mcore.parallel import shutdown_distributed
        from router_upcycling.train.trainer import train

        try:
            train(config, source)
        finally:
            shutdown_distributed()
