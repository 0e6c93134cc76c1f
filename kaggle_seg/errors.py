"""Errors the CLI turns into one clear line (a traceback only with --debug)."""


class KsegError(Exception):
    """A known failure: bad input, a missing file, a wrong option. The message names the culprit."""


class InputError(KsegError, ValueError):
    """Malformed input data: a file, a row or a column that cannot be used as it is."""


class RLEError(InputError):
    """A run-length encoding that cannot be decoded (odd tokens, bad numbers, overlapping runs)."""


def one_line(value: object) -> str:
    """`value` as one line: third-party messages (PyYAML, tifffile, torch) span several."""
    return " ".join(str(value).split())
