"""The analyses' user error, importable without torch (the command checks its arguments before loading a model)."""
from router_upcycling.errors import UserError


class AnalysisError(UserError):
    """A user error (bad model folder, layer or output path): one line, no traceback."""
