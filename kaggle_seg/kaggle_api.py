"""Publishing through the official `kaggle` package: datasets, kernels and submissions.

`kaggle` authenticates (and may call the network) when it is imported, so it is imported inside
`kaggle_api()` only; `check_credentials()` looks for credentials without it. Every call to the
client runs under `_kaggle_errors`, which turns its exceptions into one-line `KsegError`s: missing
or invalid credentials, a network failure, or an API error (HTTP status and the server's message).

Credentials, in the client's order: an access token (KAGGLE_API_TOKEN, a value or a file,
or ~/.kaggle/access_token), then KAGGLE_USERNAME / KAGGLE_KEY over `kaggle.json` in
$KAGGLE_CONFIG_DIR (else ~/.kaggle, else $XDG_CONFIG_HOME/kaggle), then `kaggle auth login`'s
~/.kaggle/credentials.json. KAGGLE_API_ENVIRONMENT=LOCALHOST sends every call to
http://localhost (tests patch kagglesdk's endpoint table to add a port: tests/fake_kaggle.py).
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
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from kaggle_seg.errors import KsegError

if TYPE_CHECKING:
    from kaggle.api.kaggle_api_extended import KaggleApi

KAGGLE_JSON = "kaggle.json"
DATASET_METADATA = "dataset-metadata.json"
KERNEL_METADATA = "kernel-metadata.json"
KAGGLE_WEB = "https://www.kaggle.com"
CREDENTIALS_HINT = "KAGGLE_USERNAME/KAGGLE_KEY, kaggle.json or KAGGLE_API_TOKEN"
MAX_LINE = 600  # characters kept of a one-line error; servers sometimes answer with a page


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


def check_credentials() -> str:
    """The Kaggle username the client will use, checked without importing `kaggle`.

    Raises KsegError naming what is missing or wrong: no credentials at all; a kaggle.json that is
    readable by others (chmod 600), unreadable, not JSON or lacking `username` / `key`; an empty
    KAGGLE_API_TOKEN file. With an access token only, the username is whatever KAGGLE_USERNAME,
    kaggle.json or credentials.json say, else "": Kaggle names a token's owner only online.
    """
    env_username = os.environ.get("KAGGLE_USERNAME", "").strip()
    env_key = os.environ.get("KAGGLE_KEY", "").strip()
    if env_username and env_key:
        return env_username

    config_file = kaggle_config_dir() / KAGGLE_JSON
    if _access_token_source() is not None:
        # The client tries a token first and ignores kaggle.json then, so a broken one is no error.
        oauth_username = str(_oauth_credentials().get("username") or "")
        return env_username or _lenient_username(config_file) or oauth_username

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

    oauth = _oauth_credentials()
    if oauth.get("refresh_token"):
        return str(oauth.get("username") or "")

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
    with _kaggle_errors("authenticating with Kaggle"):
        # `import kaggle` authenticates at once and prints a help page when that fails.
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                from kaggle.api.kaggle_api_extended import KaggleApi
            except ImportError as error:
                raise KsegError(
                    f"the kaggle package cannot be imported ({error}); "
                    "reinstall it: pip install 'kaggle>=1.6' six"
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
            source = _access_token_source()
            reason = (
                f"the access token in {source} is invalid or expired"
                if source
                else "no usable Kaggle credentials"
            )
            raise KsegError(f"{reason}: check {CREDENTIALS_HINT}") from error
    return api


def push_dataset(folder: Path, message: str = "kseg", *, public: bool = False) -> str:
    """Create the dataset that `folder/dataset-metadata.json` names, or a new version of it.

    Every file in `folder` is uploaded and every sub-folder as `<name>.zip` (Kaggle unpacks it);
    the client would otherwise skip sub-folders without a word. `message` is the version note;
    `public` applies when the dataset is created (a new version keeps its visibility).
    Returns the dataset's URL.
    """
    folder = Path(folder)
    metadata = _read_dataset_metadata(folder)
    ref = metadata["id"]
    api = kaggle_api()
    _fail_on_lost_uploads(api, ref)
    with _kaggle_errors(f"pushing dataset {ref}"):
        if _dataset_exists(api, ref):
            response = api.dataset_create_version(str(folder), message, quiet=False, dir_mode="zip")
        else:
            response = api.dataset_create_new(
                str(folder), public=public, quiet=False, dir_mode="zip"
            )
    if response.error or (response.status or "ok").lower() != "ok":
        raise KsegError(
            _one_line(f"Kaggle refused dataset {ref}: {response.error or response.status}")
        )
    return response.url or f"{KAGGLE_WEB}/datasets/{ref}"


def push_kernel(folder: Path) -> str:
    """Push the kernel in `folder` (kernel-metadata.json and its code_file) as a new version.

    Returns the kernel's URL. Raises KsegError when Kaggle did not attach a dataset, competition,
    kernel or model source: the version would run without its inputs.
    """
    folder = Path(folder)
    metadata_file = folder / KERNEL_METADATA
    if not metadata_file.is_file():
        raise KsegError(f"{metadata_file} not found: a kernel folder needs {KERNEL_METADATA}")
    metadata = _read_json(metadata_file)
    ref = metadata.get("id") or metadata.get("id_no")
    if not ref:
        raise KsegError(f"{metadata_file} has no id: set it to 'user/kernel-slug'")
    api = kaggle_api()
    with _kaggle_errors(f"pushing kernel {ref}"):
        response = api.kernels_push(str(folder))
    if response.error:
        raise KsegError(_one_line(f"Kaggle refused kernel {ref}: {response.error}"))
    url = response.url or (f"{KAGGLE_WEB}{response.ref}" if response.ref else str(ref))
    rejected = {
        "dataset_sources": response.invalid_dataset_sources,
        "competition_sources": response.invalid_competition_sources,
        "kernel_sources": response.invalid_kernel_sources,
        "model_sources": response.invalid_model_sources,
    }
    rejected = {name: sources for name, sources in rejected.items() if sources}
    if rejected:
        listed = "; ".join(f"{name} {', '.join(sources)}" for name, sources in rejected.items())
        raise KsegError(
            _one_line(
                f"kernel pushed to {url}, but Kaggle could not attach {listed}: "
                f"fix {KERNEL_METADATA} and push again"
            )
        )
    return url


def submit_file(competition: str, csv: Path, message: str) -> str:
    """Upload `csv` to a file competition and submit it. Returns the server's message."""
    csv = Path(csv)
    if not csv.is_file():
        raise KsegError(f"submission file {csv} not found")
    api = kaggle_api()
    with _kaggle_errors(f"submitting {csv.name} to {competition}"):
        response = api.competition_submit(str(csv), message, competition, quiet=False)
    if response.message == api.COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE:
        raise KsegError(f"upload of {csv} to {competition} failed: nothing was submitted")
    return response.message or f"submitted {csv.name} to {competition}"


def submit_kernel(
    competition: str,
    kernel: str,
    message: str,
    *,
    version: int | None = None,
    file_name: str = "submission.csv",
) -> str:
    """Submit `file_name` written by kernel `owner/slug` (version `version`, else the latest) to a
    code competition, where Kaggle reruns the kernel on the hidden test set.
    Returns the server's message."""
    owner, _, slug = kernel.partition("/")
    if not owner or not slug or "/" in slug:
        raise KsegError(f"kernel must be 'owner/kernel-slug', got {kernel!r}")
    if version is not None and version < 1:
        raise KsegError(f"kernel version must be 1 or more, got {version}")
    api = kaggle_api()
    described = f"{kernel} version {version}" if version else kernel
    with _kaggle_errors(f"submitting {described} to {competition}"):
        response = api.competition_submit_code(
            file_name, message, competition, kernel, version, quiet=True
        )
    return response.message or f"submitted {described} to {competition}"


# ---- credentials ----


def _access_token_source() -> str | None:
    """Where the client will find an access token (a name to show), or None. Mirrors
    kagglesdk.kaggle_env.get_access_token_from_env without importing it."""
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") and os.environ.get("KAGGLE_DATA_PROXY_URL"):
        notebook_token = os.environ.get("KAGGLE_API_V1_TOKEN")
        if notebook_token and _non_empty_file(Path(notebook_token)):
            return "KAGGLE_API_V1_TOKEN"
    token = os.environ.get("KAGGLE_API_TOKEN", "").strip()
    if token:
        token_file = Path(token)
        if _is_file(token_file) and not _non_empty_file(token_file):
            raise KsegError(f"KAGGLE_API_TOKEN names {token_file}, which is empty")
        return "KAGGLE_API_TOKEN"
    for name in ("access_token", "access_token.txt"):
        token_file = Path.home() / ".kaggle" / name
        if _non_empty_file(token_file):
            return str(token_file)
    return None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a token value too long to be a file name
        return False


def _non_empty_file(path: Path) -> bool:
    try:
        return path.is_file() and bool(path.read_text().strip())
    except OSError:
        return False


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


def _oauth_credentials() -> dict[str, Any]:
    """What `kaggle auth login` saved in ~/.kaggle/credentials.json, or {}."""
    try:
        values = json.loads((Path.home() / ".kaggle" / "credentials.json").read_text())
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


# ---- metadata ----


def _read_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise KsegError(f"cannot read {path}: {error.strerror or error}") from error
    except json.JSONDecodeError as error:
        raise KsegError(f"{path} is not valid JSON ({error.msg} at line {error.lineno})") from error
    if not isinstance(values, dict):
        raise KsegError(f"{path} must hold a JSON object")
    return values


def _read_dataset_metadata(folder: Path) -> dict[str, Any]:
    """dataset-metadata.json, checked for what creating a dataset needs: id 'user/slug', a title
    and one license; KsegError naming the first problem."""
    if not folder.is_dir():
        raise KsegError(f"dataset folder {folder} not found")
    path = folder / DATASET_METADATA
    if not path.is_file():
        raise KsegError(
            f"{path} not found: write one with id 'user/slug', title and licenses "
            f'(e.g. [{{"name": "CC0-1.0"}}]), or run kaggle datasets init -p {folder}'
        )
    metadata = _read_json(path)
    ref = metadata.get("id")
    if not isinstance(ref, str) or not re.fullmatch(r"[^/\s]+/[^/\s]+", ref):
        raise KsegError(f"{path}: id must be 'user/slug', got {ref!r}")
    title = metadata.get("title")
    if not isinstance(title, str) or not title.strip():
        raise KsegError(f"{path}: title is missing")
    if "INSERT_" in ref or "INSERT_" in title:
        raise KsegError(f"{path}: replace the INSERT_... placeholders in id and title")
    licenses = metadata.get("licenses")
    if (
        not isinstance(licenses, list)
        or len(licenses) != 1
        or not isinstance(licenses[0], dict)
        or not licenses[0].get("name")
    ):
        raise KsegError(f'{path}: licenses must name exactly one, e.g. [{{"name": "CC0-1.0"}}]')
    data = [entry for entry in folder.iterdir() if entry.name != DATASET_METADATA]
    if not data:
        raise KsegError(f"{folder} has nothing to upload besides {DATASET_METADATA}")
    return metadata


# ---- client calls ----


def _dataset_exists(api: KaggleApi, ref: str) -> bool:
    """Whether dataset `ref` exists: its status call answers 404 when it does not."""
    from requests import HTTPError

    try:
        api.dataset_status(ref)
    except HTTPError as error:
        if error.response is not None and error.response.status_code == 404:
            return False
        raise
    return True


def _fail_on_lost_uploads(api: KaggleApi, ref: str) -> None:
    """Make a failed file upload an error. Clients before 2.2.5 drop a file whose upload failed
    and go on to publish dataset `ref` without it; this wraps their per-file upload step on this
    instance (2.2.5 raises by itself, and its error reaches the user through _kaggle_errors)."""
    upload_file = api._upload_file

    def upload_or_fail(file_name: str, *args: Any, **kwargs: Any) -> Any:
        uploaded = upload_file(file_name, *args, **kwargs)
        if uploaded is None:
            raise KsegError(
                f"pushing dataset {ref} failed: upload of {Path(file_name).name} failed, "
                "nothing was published"
            )
        return uploaded

    api._upload_file = upload_or_fail


@contextlib.contextmanager
def _kaggle_errors(action: str) -> Iterator[None]:
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
            _one_line(
                f"network error while {action}: cannot reach {host} ({_network_reason(error)}); "
                "check the internet connection or proxy"
            )
        ) from error
    except requests.RequestException as error:
        raise KsegError(_one_line(f"network error while {action}: {error}")) from error
    except (ValueError, OSError) as error:  # the client's checks of metadata and files
        raise KsegError(_one_line(f"{action} failed: {error}")) from error


def _http_error_message(action: str, error: Any) -> str:
    response = error.response
    if response is None:
        return _one_line(f"Kaggle API error while {action}: {error}")
    status = response.status_code
    endpoint = urlsplit(response.url or "").path.rstrip("/").rsplit("/", 1)[-1]
    message = _server_message(response) or str(error)
    text = f"Kaggle API error while {action}: HTTP {status} {response.reason or ''}".rstrip()
    text += f" from {endpoint}: {message}" if endpoint else f": {message}"
    if status == 401:
        text += f" (credentials rejected: check {CREDENTIALS_HINT})"
    elif status == 403:
        text += " (no permission: check the owner in the metadata, or accept the competition rules)"
    return _one_line(text)


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


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 1] + "…"
