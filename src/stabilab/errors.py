"""The one exception type the command line turns into a one-line message."""


class UserError(Exception):
    """Bad input from the user (config, data, tokenizer): reported as one line, no traceback."""
