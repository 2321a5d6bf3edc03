"""The one error base class for problems of the user's making.

`eva-repro` prints a `UserError` as one line, `error: ...`, and exits 2; every message names the
file or flag at fault and the fix. Any other exception is a bug and keeps its traceback. Each
stage has its own subclass (ShardError, TrainingError, CheckpointError, ...), so callers of the
Python API can catch one stage's problems; all are ValueErrors, so code that catches ValueError
catches them too.
"""


class UserError(ValueError):
    """Bad input, flags or files, stated in one line with the fix."""
