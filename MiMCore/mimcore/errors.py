"""User-facing errors: the CLI prints their message (what is wrong, what to do) without a traceback."""


class MimError(Exception):
    """An error caused by the user's input or environment, with a message that says what to do."""


def user_error_in(err: BaseException) -> "MimError | None":
    """The MimError that caused ``err`` (libraries such as MONAI wrap exceptions raised in
    transforms into RuntimeErrors), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, MimError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class OutputError(MimError):
    """An output file or folder could not be written completely (full disk, no permission, a
    writer that failed or wrote a damaged file). Nothing new is left at ``path``.

    ``no_space``: True when the cause is a full disk or quota, so a caller writing many files
    (a batch) can stop instead of failing every remaining one."""

    def __init__(self, message: str, path=None, no_space: bool = False):
        super().__init__(message)
        self.path = path
        self.no_space = no_space
