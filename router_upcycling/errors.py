"""The base of every error that is the user's to fix (bad flags, missing or broken files).

Command-line entry points report these as one line and exit status 2, without a traceback
(router_upcycling.cli.user_errors); anything else is a bug and keeps its traceback.
"""
from typing import Mapping


class UserError(ValueError):
    """Bad input or settings, described in one line the user can act on."""


class SettingError(UserError):
    """A setting with a value it cannot take, named by its field (`topk`) rather than by a flag.

    The same setting has a different flag in each command (`upcycle --topk`, training's `--moe-router-topk`):
    the command that reports the error names its own flag (`as_flag`), so the message says what the user typed.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem

    def as_flag(self, flags: Mapping[str, str]) -> UserError:
        """The same error worded with this command's flag for the field (the field name where it has none)."""
        return UserError(f"{flags.get(self.field, self.field)} {self.problem}")
