"""The one error type of checkpoint reading and writing."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the path and the fix."""
