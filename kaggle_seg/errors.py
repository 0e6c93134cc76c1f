"""Errors the CLI turns into one clear line (a traceback only with --debug)."""

import json
import os
import re
import time


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


def record_for_torchrun(line: str, follows_another: bool = False) -> None:
    """Under torchrun, leave the error's one line where torchrun's failure summary reads it
    (TORCHELASTIC_ERROR_FILE), so its "Root Cause" names it instead of a link to its docs.
    `follows_another`: this rank only stopped because another failed (or was interrupted, as
    torchrun stops the others); torchrun takes the earliest timestamp as the root cause, so
    this one is dated a second later."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):  # not under torchrun, or something recorded already
        return
    try:
        with open(path, "w") as file:
            json.dump({"message": line, "timestamp": int(time.time()) + follows_another}, file)
    except OSError:
        pass  # the summary then falls back to torchrun's own words; the line is on stderr
