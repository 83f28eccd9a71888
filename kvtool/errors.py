"""The one exception type for bad user input.

``InputError`` is a ``ValueError`` so library callers can catch either; the CLI turns it (and
``FileNotFoundError``) into a one-line ``error: ...`` message and exit code 2. Messages name the input and
what was expected. This module does nothing else.
"""


class InputError(ValueError):
    """Bad input from the user: a missing file, an unknown name, a wrong shape, a corrupt image, ..."""
