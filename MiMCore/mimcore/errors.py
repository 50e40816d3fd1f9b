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
