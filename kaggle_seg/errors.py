"""Errors the CLI turns into one clear line (a traceback only with --debug)."""

import re


class KsegError(Exception):
    """A known failure: bad input, a missing file, a wrong option. The message names the culprit."""


class InputError(KsegError, ValueError):
    """Malformed input data: a file, a row or a column that cannot be used as it is."""


class RLEError(InputError):
    """A run-length encoding that cannot be decoded (odd tokens, bad numbers, overlapping runs)."""


def one_line(value: object) -> str:
    """`value` as one line: third-party messages (PyYAML, tifffile, torch) span several."""
    return " ".join(str(value).split())


# torch re-raises a DataLoader worker's exception as the same type, its message the worker's
# whole traceback ending in "<module>.<Type>: <the original message>".
_WORKER_TRACEBACK = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception)\w*: ", re.MULTILINE)


def error_line(value: object) -> str:
    """An error's message as one line; one raised in a DataLoader worker keeps only the
    worker's own message, not torch's wrapper and the traceback around it."""
    text = str(value)
    if text.startswith("Caught ") and "Original Traceback" in text:
        raised = list(_WORKER_TRACEBACK.finditer(text))
        if raised:
            text = text[raised[-1].end() :]
    return one_line(text)
