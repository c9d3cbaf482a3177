"""The one exception type that the CLI turns into a one-line message (no traceback)."""


class InputError(ValueError):
    """Bad user input: the message says what is wrong and what is allowed."""


def require(condition: bool, message: str) -> None:
    """Raise InputError(message) unless `condition` holds."""
    if not condition:
        raise InputError(message)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C with the one line the CLI prints for it (what was kept, how to resume).

    final=True: this line replaces every other interrupt message in the exception chain;
    otherwise the innermost message in the chain is printed.
    """

    def __init__(self, message: str, final: bool = False):
        super().__init__(message)
        self.final = final
