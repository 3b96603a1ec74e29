"""Reading the small JSON files the package's folders hold, with one-line errors for damaged ones."""
import json
from typing import Type

from router_upcycling.errors import UserError


def read_json_object(path: str, error: Type[UserError]) -> dict:
    """The JSON object in `path`; `error` (one line naming the file) when it is not valid JSON or not an object."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path} is damaged (not valid JSON: {err})") from None
    if not isinstance(value, dict):
        raise error(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value
