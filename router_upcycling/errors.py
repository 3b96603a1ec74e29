"""The base of every error that is the user's to fix (bad flags, missing or broken files).

Command-line entry points report these as one line and a non-zero exit, without a traceback
(router_upcycling.cli.user_errors); anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input or settings, described in one line the user can act on."""
