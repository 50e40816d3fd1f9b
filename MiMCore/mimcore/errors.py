"""User-facing errors: the CLI prints their message (what is wrong, what to do) without a traceback."""


class MimError(Exception):
    """An error caused by the user's input or environment, with a message that says what to do."""
