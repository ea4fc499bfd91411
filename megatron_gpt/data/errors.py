"""The one error type of the data package: a message naming the file, the line and the fix."""


class DataError(ValueError):
    """Bad input data or tokenizer files; the message says where and how to fix it."""
