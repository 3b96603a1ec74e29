"""Shared command-line behaviour."""
import argparse
import contextlib
import logging
import sys
import warnings

from router_upcycling.errors import UserError


@contextlib.contextmanager
def user_errors():
    """Turn a UserError into `error: <message>` on stderr and exit status 2."""
    try:
        yield
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose bad-flag message is the same one `error: ...` line as every other user error (no usage block)."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def setup_logging(verbose: bool = False) -> None:
    """Our own progress at INFO; megatron-core's and transformers' chatter only when it matters."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("router_upcycling").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # megatron-core warns about missing Apex/Transformer Engine and deprecated defaults on every import
        warnings.filterwarnings("ignore", module=r"megatron\.")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed")
        warnings.filterwarnings("ignore", category=FutureWarning)
