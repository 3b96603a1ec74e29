"""Shared command-line behaviour: one way to fail (a user mistake is one `error: ...` line on stderr and exit
status 2), argparse that fails the same way, and readable logs."""
import argparse
import contextlib
import logging
import sys
import warnings
from typing import Callable, Mapping, NoReturn, Optional

from router_upcycling.errors import SettingError, UserError

USER_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130


def fail(message: str) -> NoReturn:
    """Report a user mistake: `error: <message>` as one line on stderr, exit status 2."""
    print(f"error: {' '.join(str(message).split(chr(10)))}", file=sys.stderr)
    sys.exit(USER_ERROR_STATUS)


@contextlib.contextmanager
def user_errors(flags: Optional[Mapping[str, str]] = None):
    """Turn a UserError into `error: <message>` on stderr and exit status 2; a SettingError names the field by this
    command's flag (`flags`: field -> flag). Ctrl-C is `interrupted` and status 130."""
    try:
        yield
    except SettingError as err:
        fail(str(err.as_flag(flags or {})))
    except UserError as err:
        fail(str(err))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED_STATUS)


def run_command(body: Callable[[], Optional[int]], flags: Optional[Mapping[str, str]] = None) -> int:
    """Run a command's body with readable logs and the one way to fail; its exit status (0 when it returns None)."""
    setup_logging()
    with user_errors(flags):
        return body() or 0


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose bad-flag message is the same one `error: ...` line as every other user error (no usage block)."""

    def error(self, message: str):
        fail(f"{message} (see --help)")


def setup_logging(verbose: bool = False) -> None:
    """Our own progress at INFO; megatron-core's and transformers' chatter only when it matters."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("router_upcycling").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # megatron-core warns about missing Apex/Transformer Engine and deprecated defaults on every import
        warnings.filterwarnings("ignore", module=r"megatron\.")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed")
        warnings.filterwarnings("ignore", category=FutureWarning)
