"""The rehearsal's sandbox: a fresh virtualenv that sees only chosen packages, no network (a
user + network namespace, or a socket guard) and read-only inputs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

from kaggle_seg.errors import KsegError
from kaggle_seg.kernel.wheels import normalize_name, requirements_of


def image_distributions(
    names: Iterable[str], exclude: Iterable[str] = ()
) -> list[metadata.Distribution]:
    """The installed distributions `names`, with everything they depend on here (extras too:
    torch needs cuda-toolkit[cudart, ...]), except the distributions `exclude` (provided
    otherwise)."""
    seen: dict[str, metadata.Distribution] = {}
    walked: set[tuple[str, str]] = set()
    skipped = {normalize_name(n) for n in exclude}
    queue: list[tuple[str, frozenset[str]]] = [(normalize_name(n), frozenset()) for n in names]
    while queue:
        name, extras = queue.pop()
        if name in skipped or {(name, e) for e in {"", *extras}} <= walked:
            continue
        try:
            distribution = seen.get(name) or metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[name] = distribution
        walked |= {(name, e) for e in {"", *extras}}
        for requirement in requirements_of(distribution.requires, extras):
            queue.append((normalize_name(requirement.name), frozenset(requirement.extras)))
    return list(seen.values())


def _top_entries(distribution: metadata.Distribution) -> set[str]:
    """First path components of a distribution's files in site-packages (modules, dist-info,
    .libs folders); __pycache__, .pth files and files outside site-packages left out."""
    entries = set()
    for entry in distribution.files or []:
        parts = Path(entry).parts
        if parts and parts[0] not in ("..", "__pycache__") and not parts[0].endswith(".pth"):
            entries.add(parts[0])
    return entries


def expose_image_packages(
    names: Iterable[str], site_dir: Path, exclude: Iterable[str] = ()
) -> list[str]:
    """Make `site_dir` a folder of symlinks to the installed distributions `names` (and their
    dependencies, except `exclude`): their modules and .dist-info, and nothing else of this
    environment.

    A folder shared with a distribution that is not exposed (a namespace package) is recreated
    and only the exposed distributions' entries inside it are linked. Returns the names exposed.
    """
    exposed = image_distributions(names, exclude)
    exposed_names = {normalize_name(d.metadata["Name"]) for d in exposed}
    owners: dict[tuple[Path, str], set[str]] = {}
    for distribution in metadata.distributions():
        base = Path(distribution.locate_file(""))
        for entry in _top_entries(distribution):
            owners.setdefault((base, entry), set()).add(
                normalize_name(distribution.metadata["Name"])
            )
    site_dir.mkdir(parents=True, exist_ok=True)
    for distribution in exposed:
        base = Path(distribution.locate_file(""))
        for entry in _top_entries(distribution):
            source, link = base / entry, site_dir / entry
            if not source.exists() or link.is_symlink():
                continue
            if owners.get((base, entry), set()) <= exposed_names:
                if not link.exists():
                    link.symlink_to(source)
                continue
            # Shared folder: link only this distribution's own children.
            link.mkdir(exist_ok=True)
            for child in {
                Path(f).parts[1]
                for f in distribution.files or []
                if len(Path(f).parts) > 2 and Path(f).parts[0] == entry
            }:
                if child != "__pycache__" and not (link / child).exists():
                    (link / child).symlink_to(source / child)
    return sorted(exposed_names)


SOCKET_GUARD = '''"""Written by `kseg kernel rehearse`: Kaggle kernels run offline."""
import socket

_connect, _connect_ex, _getaddrinfo = (
    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
)


def _local(address):
    if not isinstance(address, tuple):
        return True  # AF_UNIX path
    host = str(address[0])
    return host in ("localhost", "::1", "") or host.startswith("127.")


def _refuse(address):
    return OSError(101, f"Network is unreachable (kseg kernel rehearse: offline kernel): {address}")


def connect(self, address):
    if self.family != getattr(socket, "AF_UNIX", None) and not _local(address):
        raise _refuse(address)
    return _connect(self, address)


def connect_ex(self, address):
    if self.family != getattr(socket, "AF_UNIX", None) and not _local(address):
        raise _refuse(address)
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if host is not None and not _local((host,)):
        raise socket.gaierror(-3, f"Temporary failure in name resolution (offline): {host}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = (
    connect, connect_ex, getaddrinfo
)
'''

# Run the command with `$1` (the input folder) bind-mounted read-only over itself.
# The new network namespace has only a loopback, and it starts down: up, so torchrun's
# localhost rendezvous works as on Kaggle (best effort where `ip` is missing).
READ_ONLY_SH = (
    "{ ip link set lo up 2>/dev/null || true; } && "
    'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
)


def _unshare_works() -> bool:
    """True where a user + network + mount namespace can be made and a folder mounted read-only."""
    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory(prefix="kseg-probe-") as probe:
        command = ["unshare", "-rnm", "sh", "-c", READ_ONLY_SH, "sh", probe, "true"]
        try:
            return subprocess.run(command, capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False


def resolve_isolation(isolation: str) -> str:
    """`unshare` (network namespace, read-only bind mount), `guard` (socket guard, write-
    protected folders) or `auto`: unshare where the kernel allows it."""
    if isolation not in ("auto", "unshare", "guard"):
        raise KsegError(f"--isolation {isolation!r}: choose auto, unshare or guard")
    if isolation == "guard":
        return "guard"
    if _unshare_works():
        return "unshare"
    if isolation == "unshare":
        raise KsegError("unshare -rnm is not available here; use --isolation guard")
    return "guard"


def site_packages(venv: Path) -> Path:
    """The site-packages folder of a virtualenv made with this Python."""
    return (
        venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    )


def make_kaggle_venv(venv: Path, image_sites: Path | Sequence[Path], *, guard: bool) -> Path:
    """A fresh virtualenv that sees the folders `image_sites` too (pip included there, as in
    the image); returns its python. Its own site-packages start empty: no setuptools from
    ensurepip."""
    sites = [image_sites] if isinstance(image_sites, Path) else list(image_sites)
    result = subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise KsegError(f"creating the rehearsal virtualenv failed: {result.stderr.strip()}")
    site = site_packages(venv)
    (site / "kaggle_image.pth").write_text("".join(f"{folder}\n" for folder in sites))
    if guard:
        (site / "kseg_socket_guard.py").write_text(SOCKET_GUARD)
        (site / "kseg_socket_guard.pth").write_text("import kseg_socket_guard\n")
    return venv / "bin" / "python"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under `folder`, to see whether a run changed it."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def set_writable(folder: Path, writable: bool) -> None:
    """Folders only: files may be hard links to the source data, whose modes must not change."""
    for directory in [folder, *(p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink())]:
        mode = directory.stat().st_mode
        directory.chmod(mode | 0o200 if writable else mode & ~0o222)
