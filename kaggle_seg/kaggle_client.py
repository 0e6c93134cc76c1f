"""The official `kaggle` client, authenticated, and its errors as one line.

`kaggle` authenticates (and may call the network) when it is imported, so it is imported inside
`kaggle_api()` only; `check_credentials()` looks for credentials without it. Every call to a
client runs under `kaggle_errors`, which turns its exceptions into one-line `KsegError`s: missing
or invalid credentials, a network failure, or an API error (HTTP status and the server's message).

Credentials, in the client's order: an access token (kagglesdk's own lookup: KAGGLE_API_TOKEN,
a value or a file, or ~/.kaggle/access_token), then KAGGLE_USERNAME / KAGGLE_KEY over
`kaggle.json` in $KAGGLE_CONFIG_DIR (else ~/.kaggle, else $XDG_CONFIG_HOME/kaggle), then
`kaggle auth login`'s credentials. KAGGLE_API_ENVIRONMENT=LOCALHOST sends every call to
http://localhost (tests patch kagglesdk's endpoint table to add a port: tests/fake_kaggle.py).

Some calls need a newer client than the floor (kaggle>=1.7.4, what Kaggle's image satisfies):
`require_client` says which and why, before anything is sent.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import stat
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from kaggle_seg.errors import KsegError

if TYPE_CHECKING:
    from kaggle.api.kaggle_api_extended import KaggleApi

KAGGLE_JSON = "kaggle.json"
KAGGLE_WEB = "https://www.kaggle.com"
CREDENTIALS_HINT = "KAGGLE_USERNAME/KAGGLE_KEY, kaggle.json or KAGGLE_API_TOKEN"
MAX_LINE = 600  # characters kept of a one-line error; servers sometimes answer with a page
# What kseg needs of the client beyond the floor: feature -> (version, why).
CLIENT_NEEDS = {
    "dataset push": ("2.2.5", "older clients publish a dataset without a file whose upload failed"),
    "accelerator": ("1.8", "older clients ignore machine_shape, so Kaggle may hand out a P100"),
    "kernel version": ("2.2.5", "older clients ask about the latest version only"),
}


def kaggle_config_dir() -> Path:
    """Where the client looks for kaggle.json: $KAGGLE_CONFIG_DIR, else ~/.kaggle, else (Linux,
    when ~/.kaggle does not exist) $XDG_CONFIG_HOME/kaggle."""
    override = os.environ.get("KAGGLE_CONFIG_DIR")
    if override:
        return Path(override).expanduser()
    legacy = Path.home() / ".kaggle"
    if sys.platform.startswith("linux") and not legacy.exists():
        return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kaggle"
    return legacy


def client_version() -> str:
    """The installed `kaggle` client's version, read without importing it."""
    try:
        return metadata.version("kaggle")
    except metadata.PackageNotFoundError:
        raise KsegError(
            "the kaggle package is not installed: pip install 'kaggle>=1.7.4'"
        ) from None


def client_has(feature: str) -> bool:
    """Whether the installed client does `feature` (a key of CLIENT_NEEDS) the way kseg needs."""
    return _version_tuple(client_version()) >= _version_tuple(CLIENT_NEEDS[feature][0])


def require_client(feature: str, action: str) -> None:
    """KsegError naming `action`, the installed client, the version `feature` needs, and why."""
    if not client_has(feature):
        needed, why = CLIENT_NEEDS[feature]
        raise KsegError(
            f"{action} needs kaggle>={needed}, this is kaggle {client_version()} ({why}): "
            f"pip install -U 'kaggle>={needed}'"
        )


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def check_credentials() -> str:
    """The Kaggle username the client will use, checked without importing `kaggle`.

    Raises KsegError naming what is missing or wrong: no credentials at all; a kaggle.json that is
    readable by others (chmod 600), unreadable, not JSON or lacking `username` / `key`; an empty
    KAGGLE_API_TOKEN file. With an access token only, the username is whatever KAGGLE_USERNAME or
    kaggle.json say, else "": Kaggle names a token's owner only online.
    """
    env_username = os.environ.get("KAGGLE_USERNAME", "").strip()
    env_key = os.environ.get("KAGGLE_KEY", "").strip()
    if env_username and env_key:
        return env_username

    config_file = kaggle_config_dir() / KAGGLE_JSON
    if _access_token_found():
        # The client tries a token first and ignores kaggle.json then, so a broken one is no error.
        return env_username or _lenient_username(config_file)

    if config_file.exists():
        values = _read_kaggle_json(config_file)
        username = env_username or str(values.get("username") or "").strip()
        key = env_key or str(values.get("key") or "").strip()
        missing = [name for name, value in (("username", username), ("key", key)) if not value]
        if missing:
            raise KsegError(
                f"{config_file} has no {' or '.join(missing)}: download a new kaggle.json "
                f"from {KAGGLE_WEB}/settings (API, Create New Token)"
            )
        return username

    oauth = _oauth_credentials_file()
    if oauth is not None and oauth.is_file():
        return env_username  # `kaggle auth login`: the client knows the user

    raise KsegError(
        "no Kaggle credentials: set KAGGLE_USERNAME and KAGGLE_KEY, or KAGGLE_API_TOKEN, "
        f"or save kaggle.json in {config_file.parent} (chmod 600); "
        f"tokens are made at {KAGGLE_WEB}/settings"
    )


def kaggle_api() -> KaggleApi:
    """An authenticated `kaggle.api.KaggleApi`, imported on first use.

    Credentials are checked first (check_credentials), so their errors read the same with or
    without the client; the client's own failures become one-line KsegErrors too.
    """
    check_credentials()
    with kaggle_errors("authenticating with Kaggle"):
        # `import kaggle` authenticates at once and prints a help page when that fails.
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                from kaggle.api.kaggle_api_extended import KaggleApi
            except ImportError as error:
                raise KsegError(
                    f"the kaggle package cannot be imported ({error}); "
                    "reinstall it: pip install 'kaggle>=1.7.4' six"
                ) from error
        api = KaggleApi()
        # KaggleApi reads KAGGLE_CONFIG_DIR and KAGGLE_API_ENVIRONMENT once, when first imported,
        # into class attributes; read them again so the current environment is the one used.
        config_dir = kaggle_config_dir()
        api.config_dir = str(config_dir)
        api.config = str(config_dir / KAGGLE_JSON)
        api.args = [arg for arg in KaggleApi.args if arg != "--local"]
        if os.environ.get("KAGGLE_API_ENVIRONMENT") == "LOCALHOST":
            api.args.append("--local")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                api.authenticate()
        except SystemExit as error:
            reason = (
                "the Kaggle access token is invalid or expired"
                if _access_token_found()
                else "no usable Kaggle credentials"
            )
            raise KsegError(f"{reason}: check {CREDENTIALS_HINT}") from error
    return api


# ---- credentials ----


def _access_token_found() -> bool:
    """Whether the client will find an access token (kagglesdk's lookup; clients before 1.8
    have none and take no tokens). KsegError for a KAGGLE_API_TOKEN file that is empty."""
    try:
        from kagglesdk.kaggle_env import get_access_token_from_env
    except ImportError:
        return False
    try:
        token, source = get_access_token_from_env()
    except OSError as error:
        raise KsegError(f"KAGGLE_API_TOKEN cannot be read: {error}") from error
    if source == "KAGGLE_API_TOKEN" and not token:
        raise KsegError(f"KAGGLE_API_TOKEN names {os.environ['KAGGLE_API_TOKEN']}, which is empty")
    return bool(token)


def _oauth_credentials_file() -> Path | None:
    """Where `kaggle auth login` keeps credentials, as kagglesdk names it (None: no such login)."""
    try:
        from kagglesdk.kaggle_creds import KaggleCredentials
    except ImportError:
        return None
    return Path(KaggleCredentials.DEFAULT_CREDENTIALS_FILE).expanduser()


def _read_kaggle_json(path: Path) -> dict[str, Any]:
    """kaggle.json's values; KsegError when others may read it, or it is unreadable or not JSON."""
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as error:
        raise KsegError(f"cannot read {path}: {error.strerror or error}") from error
    if os.name != "nt" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KsegError(
            f"{path} is open to other users (mode {stat.S_IMODE(mode):03o}): run chmod 600 {path}"
        )
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise KsegError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno}): download a new one "
            f"from {KAGGLE_WEB}/settings"
        ) from error
    if not isinstance(values, dict):
        raise KsegError(f'{path} must hold a JSON object {{"username": ..., "key": ...}}')
    return values


def _lenient_username(config_file: Path) -> str:
    try:
        values = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return ""
    return str(values.get("username") or "") if isinstance(values, dict) else ""


def read_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise KsegError(f"cannot read {path}: {error.strerror or error}") from error
    except json.JSONDecodeError as error:
        raise KsegError(f"{path} is not valid JSON ({error.msg} at line {error.lineno})") from error
    if not isinstance(values, dict):
        raise KsegError(f"{path} must hold a JSON object")
    return values


# ---- errors ----


@contextlib.contextmanager
def kaggle_errors(action: str) -> Iterator[None]:
    """Turn the client's exceptions into one-line KsegErrors that say what was being done."""
    import requests

    try:
        yield
    except KsegError:
        raise
    except requests.HTTPError as error:
        raise KsegError(_http_error_message(action, error)) from error
    except (requests.ConnectionError, requests.Timeout) as error:
        url = error.request.url if error.request is not None else None
        host = "the Kaggle API"
        if url:
            parts = urlsplit(url)
            host = f"{parts.scheme}://{parts.netloc}"
        raise KsegError(
            one_line(
                f"network error while {action}: cannot reach {host} ({_network_reason(error)}); "
                "check the internet connection or proxy"
            )
        ) from error
    except requests.RequestException as error:
        raise KsegError(one_line(f"network error while {action}: {error}")) from error
    except (ValueError, OSError) as error:  # the client's checks of metadata and files
        raise KsegError(one_line(f"{action} failed: {error}")) from error


def _http_error_message(action: str, error: Any) -> str:
    response = error.response
    if response is None:
        return one_line(f"Kaggle API error while {action}: {error}")
    status = response.status_code
    endpoint = urlsplit(response.url or "").path.rstrip("/").rsplit("/", 1)[-1]
    message = _server_message(response) or str(error)
    text = f"Kaggle API error while {action}: HTTP {status} {response.reason or ''}".rstrip()
    text += f" from {endpoint}: {message}" if endpoint else f": {message}"
    if status == 401:
        text += f" (credentials rejected: check {CREDENTIALS_HINT})"
    elif status == 403:
        text += " (no permission: check the owner in the metadata, or accept the competition rules)"
    return one_line(text)


def _server_message(response: Any) -> str:
    """The message in an error response: its JSON `message` (or `error`), else its text."""
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        for name in ("message", "error", "detail"):
            if payload.get(name):
                return str(payload[name])
    return (response.text or "").strip()


def _network_reason(error: Exception) -> str:
    """The innermost cause of a connection error, e.g. "[Errno 111] Connection refused"."""
    reason: Any = error.args[0] if error.args else error
    reason = getattr(reason, "reason", reason)
    text = str(reason)
    text = re.sub(r"<[^>]*>:\s*", "", text)  # urllib3 puts a connection object's repr first
    match = re.search(r"\[Errno -?\d+\][^)'\"]*|timed out|Name or service not known", text)
    return match.group(0).strip() if match else text


def one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 1] + "…"
