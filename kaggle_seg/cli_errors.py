"""How `kseg` ends when a command fails: one line per error, named for its rank under torchrun.

A known error (a bad file, option or config key) prints one line and exits 1; anything else
prints its type and message with a hint to rerun with --debug for the traceback. SIGTERM (a
scheduler, Kaggle, `timeout`) unwinds like Ctrl-C, so temporary files go and training says how
to resume. Under torchrun the rank that failed says why, and its peers only say they stopped.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

import typer

from kaggle_seg.errors import KsegError, error_line, record_for_torchrun


def _ignore_signal(signum: int, frame: object) -> None:
    pass


def _terminated(signum: int, frame: object) -> None:
    # `kill` (SIGTERM, also how Kaggle and batch schedulers stop a job) unwinds like Ctrl-C:
    # temporary files are removed and training says how to resume.
    # A process-group kill (`timeout`, a scheduler) stops the DataLoader workers too; torch's
    # SIGCHLD handler would then raise "worker killed by signal" over this interruption (or
    # print a traceback at exit). Their deaths are expected from here on.
    signal.signal(signal.SIGCHLD, _ignore_signal)
    raise KeyboardInterrupt


def run_reporting_errors(app: Callable[[], object]) -> None:
    """Run the command line `app`: one clear line per known error, the traceback with --debug,
    SIGTERM unwound like Ctrl-C, and under torchrun each line labelled with its rank."""
    debug = "--debug" in sys.argv[1:]
    signal.signal(signal.SIGTERM, _terminated)
    rank = _rank_label()
    try:
        app()
    except (KsegError, KeyError, FileNotFoundError, PermissionError) as exc:
        if debug:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        _fail(rank, f"error: {error_line(message)}")
    except KeyboardInterrupt:
        # torchrun stops the other ranks with SIGTERM once one fails: never the root cause.
        _fail(rank, "interrupted", code=130, follows=True)
    except Exception as exc:
        if debug:
            raise
        if rank and _lost_a_peer(exc):  # the rank that failed has said why; this one only stops
            _fail(rank, "stopped: another rank ended; its own line says why", follows=True)
        hint = "rerun with --debug for the traceback"
        _fail(rank, f"error: {type(exc).__name__}: {error_line(exc)} ({hint})")


def _fail(rank: str, line: str, code: int = 1, follows: bool = False) -> NoReturn:
    """Print the one line (labelled with the rank under torchrun), leave it for torchrun's
    failure summary too, and exit."""
    typer.echo(f"{rank}{line}", err=True)
    record_for_torchrun(line, follows_another=follows)
    sys.exit(code)


def _rank_label() -> str:
    """'rank N: ' under torchrun with several processes, so each of their lines says whose it
    is (every rank reports its own error; one rank's bad file is not another's)."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f"rank {os.environ.get('RANK', '?')}: " if world.isdigit() and int(world) > 1 else ""


def _lost_a_peer(exc: BaseException) -> bool:
    """A collective that failed because another rank exited (gloo: connection closed or reset
    by peer; NCCL: a remote process exited or the communicator was aborted)."""
    text = str(exc).lower()
    signs = ("closed by peer", "reset by peer", "connection closed", "remote process", "abort")
    # torch.distributed's DistBackendError and DistNetworkError are RuntimeErrors too.
    return isinstance(exc, RuntimeError) and any(sign in text for sign in signs)
