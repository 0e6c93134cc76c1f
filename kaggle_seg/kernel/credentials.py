"""No credential in a package: find Kaggle keys and tokens in a built kernel, a dataset or a
model before anything is written or pushed.

Two searches, over every file and every member of every zip file (wheels, `.pt` checkpoints):
- this machine's own credentials, byte for byte ($KAGGLE_KEY, $KAGGLE_API_TOKEN, kaggle.json,
  access_token, credentials.json), and files named like credentials files;
- anything shaped like a Kaggle secret, whoever it belongs to: a 32-hex-character key shortly
  after the word "key" (kaggle.json content, `KAGGLE_KEY=...`, a config entry, a pickled dict in
  a checkpoint) and an API token (`KGAT_...`).
Messages name the place, never the secret.
"""

from __future__ import annotations

import contextlib
import os
import re
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from kaggle_seg.errors import KsegError
from kaggle_seg.kernel.names import kaggle_config_dirs, read_json_object

# Names that hold credentials wherever they turn up, loose or inside an archive.
CREDENTIAL_FILES = ("kaggle.json", "access_token", "access_token.txt", "credentials.json")
# A legacy key is 32 lower-case hex digits; "key" (KAGGLE_KEY, "key":, api_key=) comes at most
# a few bytes before it, binary ones included (a pickled dict in a checkpoint). A longer hex
# run (a sha256, a git hash) is no key.
_HEX_KEY = rb"(?<![0-9A-Fa-f])[0-9a-f]{32}(?![0-9A-Fa-f])"
SECRET_PATTERNS: dict[str, re.Pattern[bytes]] = {
    "a Kaggle key": re.compile(rb"(?i:key).{0,24}?" + _HEX_KEY, re.DOTALL),
    "a Kaggle API token": re.compile(rb"KGAT_[0-9A-Za-z]{16,}"),
}
_OVERLAP = 96  # bytes kept between chunks, longer than any pattern's match


def known_secrets() -> list[str]:
    """The Kaggle credentials this machine holds, to search built packages for: $KAGGLE_KEY,
    $KAGGLE_API_TOKEN (a value or a file), kaggle.json's key, ~/.kaggle/access_token and the
    tokens of credentials.json. Nothing here writes them out."""
    values: list[Any] = [os.environ.get("KAGGLE_KEY")]
    token = os.environ.get("KAGGLE_API_TOKEN", "").strip()
    if token:
        values.append(token)
        with contextlib.suppress(OSError, ValueError):
            values.append(Path(token).read_text().strip())
    for config_dir in kaggle_config_dirs():
        values.append(read_json_object(config_dir / "kaggle.json").get("key"))
    kaggle_home = Path.home() / ".kaggle"
    for name in ("access_token", "access_token.txt"):
        with contextlib.suppress(OSError, ValueError):
            values.append((kaggle_home / name).read_text().strip())
    oauth = read_json_object(kaggle_home / "credentials.json")
    values += [v for k, v in oauth.items() if "token" in k.lower()]
    # Very short values would match by chance; real keys and tokens are 32 characters and more.
    return sorted({v for v in values if isinstance(v, str) and len(v) >= 8})


def scan_stream(stream: IO[bytes], needles: Sequence[bytes], chunk: int = 1 << 20) -> str | None:
    """What `stream` holds, if anything: "a Kaggle key" (one of `needles`, or key-shaped) or "a
    Kaggle API token"; None when it is clean."""
    overlap = max([_OVERLAP, *(len(n) for n in needles)])
    tail = b""
    while block := stream.read(chunk):
        window = tail + block
        if any(n in window for n in needles):
            return "a Kaggle key"
        for what, pattern in SECRET_PATTERNS.items():
            if pattern.search(window):
                return what
        tail = window[-overlap:]
    return None


def find_credentials(folder: str | Path, secrets: Iterable[str] | None = None) -> list[str]:
    """Every place under `folder` where a credential turns up: a file named like kaggle.json or
    access_token, or a file (or a member of a zip file: wheels, checkpoints) holding this
    machine's secrets (`secrets`, default `known_secrets()`) or anything shaped like one.

    The messages name the place, never the secret.
    """
    needles = [s.encode() for s in (known_secrets() if secrets is None else secrets) if s]
    folder = Path(folder)
    problems = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        where = path.relative_to(folder)
        if path.name in CREDENTIAL_FILES:
            problems.append(f"{where}: a Kaggle credentials file")
            continue
        inside = _zip_credentials(path, where, needles) if zipfile.is_zipfile(path) else []
        problems += inside
        if not inside:
            with path.open("rb") as stream:
                found = scan_stream(stream, needles)
            if found:
                problems.append(f"{where}: holds {found}")
    return problems


def _zip_credentials(path: Path, where: Path, needles: Sequence[bytes]) -> list[str]:
    problems = []
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            if Path(member.filename).name in CREDENTIAL_FILES:
                problems.append(f"{where}!{member.filename}: a Kaggle credentials file")
                continue
            with archive.open(member) as stream:
                found = scan_stream(stream, needles)
            if found:
                problems.append(f"{where}!{member.filename}: holds {found}")
    return problems


def check_no_credentials(folder: Path, skip: str | None = None) -> None:
    """KsegError naming the first places under `folder` that hold a credential (those under
    `skip`, a sub-folder of kseg's own, left out)."""
    problems = [p for p in find_credentials(folder) if not (skip and p.startswith(skip))]
    if problems:
        raise KsegError(
            f"{folder}: Kaggle credentials found ({'; '.join(problems[:3])}); nothing is "
            "pushed or kept with a credential inside"
        )
