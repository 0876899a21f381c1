"""User-facing errors.

A `FlexmoeError` is a mistake the user can fix (bad file, bad key, bad model). The CLI
prints its message as one line and exits non-zero; it never shows a traceback for it.
"""


class FlexmoeError(Exception):
    """A user mistake or an unusable input; the message names the file, line, key or layer."""
