"""Errors the CLI reports as a one-line message (no traceback) with exit code 2."""


class QuantpipeError(Exception):
    """A problem the user can fix: bad recipe, missing model or data, corrupt artifact."""


class RecipeError(QuantpipeError):
    """The recipe is invalid. `field` is the dotted path of the offending entry."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"recipe field '{field}': {message}")
