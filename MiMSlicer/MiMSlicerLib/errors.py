"""The one exception type of MiMSlicerLib: its message says what is wrong and what to do."""


class MiMSlicerError(Exception):
    """A problem the user can fix (wrong node, missing segment, failed job, ...).

    The message is meant to be shown as it is, e.g. in ``slicer.util.errorDisplay``.
    """
