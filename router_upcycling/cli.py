"""Shared command-line behaviour."""
import contextlib
import sys

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
