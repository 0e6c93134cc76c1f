"""The packages a rehearsal runs against: Kaggle's image, as kernels/kaggle_image.txt pins it.

`kaggle` (the default): a virtualenv with every pin installed from the package registry at
Kaggle's version, built once and cached by the pins, this Python and the local packages it
borrows. What the registry cannot give at the pinned version is taken from this machine
instead, and so is torch (with torchvision / torchaudio) by design: Kaggle's are CUDA or +cpu
builds from PyTorch's own index, and the registry's Linux torch pulls gigabytes of CUDA
libraries. `local`: this machine's versions of the pinned packages, as before; weaker, since
a kernel that passes here can still break on Kaggle's versions.

Each way, `version_table` says where the rehearsal's versions differ from Kaggle's.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from kaggle_seg.errors import KsegError
from kaggle_seg.kernel.sandbox import expose_image_packages, site_packages
from kaggle_seg.kernel.wheels import normalize_name

IMAGE_VERSIONS = ("kaggle", "local")
IMAGE_CACHE_ENV = "KSEG_IMAGE_CACHE"
MARKER = "kseg-image.json"
# Taken from this machine whatever the pins say, and why.
LOCAL_BY_DESIGN = {
    "torch": "Kaggle's torch is a CUDA (GPU image) or +cpu build from PyTorch's own index",
    "torchvision": "built against torch, taken with it",
    "torchaudio": "built against torch, taken with it",
}
# pip's words when the registry cannot be reached at all (then no pin is "missing").
_OFFLINE = re.compile(
    r"NewConnectionError|Network is unreachable|Temporary failure in name resolution|"
    r"ConnectTimeout|Max retries exceeded|Could not fetch URL"
)
_NOT_ON_REGISTRY = "this machine: the registry has no such version"
MAX_NOT_ON_REGISTRY = 5  # more pins missing than this: the registry is unreachable, say so
_MISSING = re.compile(
    r"(?:No matching distribution found for|Could not find a version that satisfies the "
    r"requirement) ([A-Za-z0-9][A-Za-z0-9._-]*)=="
)


@dataclass
class PinRow:
    """One pinned package: Kaggle's version, the rehearsal's, this machine's, and why they may
    differ."""

    name: str
    kaggle: str | None
    rehearsal: str | None
    local: str | None
    source: str  # "registry", "this machine: <why>" or "absent"


@dataclass
class ImageEnv:
    """The folders a rehearsal virtualenv sees, and how their versions compare with Kaggle's."""

    mode: str
    sites: list[Path]
    rows: list[PinRow]
    location: Path
    built: bool = False  # installed now (else: reused from the cache)
    notes: list[str] = field(default_factory=list)


def image_cache_dir() -> Path:
    """Where Kaggle-pinned environments are kept between rehearsals ($KSEG_IMAGE_CACHE)."""
    override = os.environ.get(IMAGE_CACHE_ENV)
    if override:
        return Path(override)
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "kaggle_seg" / "kaggle-image"


def local_version(name: str) -> str | None:
    """The version of `name` installed here, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def prepare_image_env(
    image: dict[str, str | None],
    work: Path,
    *,
    mode: str = "kaggle",
    cache_dir: Path | None = None,
    pip_args: Sequence[str] = (),
    say: Callable[[str], None] = print,
) -> ImageEnv:
    """The packages of Kaggle's image for a rehearsal, the way `mode` asks (see the module)."""
    if mode not in IMAGE_VERSIONS:
        raise KsegError(f"--image-versions {mode!r}: choose one of {', '.join(IMAGE_VERSIONS)}")
    if mode == "local":
        site = work / "kaggle_image"
        # pip too: the image has it, and the kernel installs with it.
        expose_image_packages([*image, "pip"], site)
        rows = [
            PinRow(name, pin, local_version(name), local_version(name), "this machine: local")
            for name, pin in sorted(image.items())
        ]
        return ImageEnv(mode, [site], rows, site)
    borrowed = {n: f"this machine: {why}" for n, why in LOCAL_BY_DESIGN.items() if n in image}
    borrowed |= {n: "this machine: not pinned" for n, pin in image.items() if pin is None}
    borrowed = _with_their_needs(image, borrowed)
    key = _cache_key(image, borrowed, pip_args)
    location = (cache_dir or image_cache_dir()) / key
    if (location / MARKER).is_file():
        record = json.loads((location / MARKER).read_text())
        rows = [PinRow(**row) for row in record["rows"]]
        return ImageEnv(mode, _sites(location), rows, location, notes=record["notes"])
    say(f"installing Kaggle's image versions into {location} (once; later rehearsals reuse it)")
    rows, notes = _install_pins(image, borrowed, location, pip_args)
    record = {"rows": [asdict(r) for r in rows], "notes": notes}
    (location / MARKER).write_text(json.dumps(record, indent=1))
    return ImageEnv(mode, _sites(location), rows, location, built=True, notes=notes)


def _with_their_needs(image: dict[str, str | None], borrowed: dict[str, str]) -> dict[str, str]:
    """`borrowed`, plus every pinned package whose Kaggle version a borrowed one (or what it
    brings along) does not accept: torch 2.14 here needs a newer setuptools than Kaggle's
    torch 2.10 does, and pip in the kernel would refuse the mix."""
    from packaging.version import InvalidVersion

    from kaggle_seg.kernel.sandbox import image_distributions
    from kaggle_seg.kernel.wheels import requirements_of

    borrowed = dict(borrowed)
    changed = True
    while changed:
        changed = False
        pinned = [n for n in image if n not in borrowed]
        for distribution in image_distributions(borrowed, exclude=pinned):
            for requirement in requirements_of(distribution.requires):
                name = normalize_name(requirement.name)
                pin = image.get(name) if name in pinned else None
                try:
                    accepted = pin is None or requirement.specifier.contains(pin, prereleases=True)
                except InvalidVersion:
                    accepted = True
                if not accepted and name not in borrowed:
                    owner = f"{distribution.metadata['Name']} {distribution.version}"
                    borrowed[name] = f"this machine: {owner} needs {requirement.specifier}"
                    changed = True
    return borrowed


def _cache_key(image: dict[str, str | None], borrowed: dict[str, str], pip_args: Sequence[str]):
    text = json.dumps(
        {
            "pins": sorted(image.items()),
            "borrowed": sorted((n, local_version(n)) for n in borrowed),
            "python": sys.version,
            "platform": platform.platform(),
            "pip_args": list(pip_args),
        }
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sites(location: Path) -> list[Path]:
    """The pinned packages first: they shadow any borrowed package's dependency of the same
    name."""
    return [site_packages(location / "venv"), location / "local"]


def _install_pins(
    image: dict[str, str | None], borrowed: dict[str, str], location: Path, pip_args: Sequence[str]
) -> tuple[list[PinRow], list[str]]:
    """A virtualenv under `location` with every pin not `borrowed`, from the registry, exactly
    (no dependency resolution: the pins are the image's whole dependency tree, as Kaggle's is);
    a pin the registry lacks is borrowed from this machine instead and the install retried.
    Returns the rows and what `pip check` finds missing or mismatched among them."""
    shutil.rmtree(location, ignore_errors=True)
    venv = location / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    while True:
        shutil.rmtree(location / "local", ignore_errors=True)
        # Borrowed packages come with their own dependencies, except what the pins provide.
        pinned = [n for n in image if n not in borrowed]
        expose_image_packages(borrowed, location / "local", exclude=pinned)
        (site_packages(venv) / "kseg_borrowed.pth").write_text(f"{location / 'local'}\n")
        requirements = [f"{n}=={image[n]}" for n in pinned]
        if not requirements:
            break
        result = _pip(python, ["install", "--no-deps", "--only-binary", ":all:", *pip_args,
                               *requirements])  # fmt: skip
        if result.returncode == 0:
            break
        said = result.stdout + result.stderr
        if _OFFLINE.search(said):
            raise KsegError(
                f"installing Kaggle's image versions: the package registry cannot be reached "
                f"({_OFFLINE.search(said).group(0)}); rehearse with --image-versions local"
            )
        missing = {normalize_name(m) for m in _MISSING.findall(said)}
        missing &= set(pinned)
        lacking = [n for n, why in borrowed.items() if why == _NOT_ON_REGISTRY] + sorted(missing)
        if len(lacking) > MAX_NOT_ON_REGISTRY:
            raise KsegError(
                f"installing Kaggle's image versions: the registry has none of "
                f"{', '.join(lacking)}; if it cannot be reached, rehearse with "
                "--image-versions local"
            )
        if not missing:
            lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
            errors = [line for line in lines if line.startswith("ERROR")] or lines[-1:]
            raise KsegError(f"installing Kaggle's image versions failed: {' '.join(errors[:2])}")
        borrowed |= {n: _NOT_ON_REGISTRY for n in missing}
    seen = _versions_seen(python, list(image))
    rows = []
    for name, pin in sorted(image.items()):
        source = borrowed.get(name, "registry") if seen.get(name) else "absent"
        rows.append(PinRow(name, pin, seen.get(name), local_version(name), source))
    check = _pip(python, ["check"]).stdout.splitlines()
    return rows, [line.strip() for line in check if "requires" in line or "has requirement" in line]


def _pip(python: Path, arguments: list[str]) -> subprocess.CompletedProcess:
    """This environment's pip, run for the interpreter `python`, quietly."""
    command = [sys.executable, "-m", "pip", "--python", str(python), *arguments,
               "--no-input", "--disable-pip-version-check"]  # fmt: skip
    if arguments[0] == "install":
        command += ["--progress-bar", "off", "--no-warn-script-location"]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def _versions_seen(python: Path, names: Sequence[str]) -> dict[str, str]:
    """The version of each distribution in `names` that `python` imports (the first on its
    path), asked of it."""
    code = (
        "import json, sys\nfrom importlib import metadata\nseen = {}\n"
        "for name in sys.argv[1:]:\n    try:\n        seen[name] = metadata.version(name)\n"
        "    except metadata.PackageNotFoundError:\n        pass\nprint(json.dumps(seen))"
    )
    result = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True,
                            check=True)  # fmt: skip
    return json.loads(result.stdout)


def version_table(env: ImageEnv) -> list[str]:
    """Printable lines: every pin whose rehearsal version differs from Kaggle's (what the
    kernel was not tested against), then a count of those that match, here and in the
    rehearsal; this machine's own differences do not reach the kernel, so only their count."""
    differ = [r for r in env.rows if r.kaggle and r.rehearsal != r.kaggle]
    header = ("package", "Kaggle image", "rehearsal", "this machine", "rehearsal's from")
    table = [header] + [
        (r.name, r.kaggle or "-", r.rehearsal or "-", r.local or "-", r.source) for r in differ
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]
    same = sum(r.rehearsal == r.kaggle for r in env.rows if r.kaggle)
    pinned = sum(bool(r.kaggle) for r in env.rows)
    local_same = sum(r.local == r.kaggle for r in env.rows if r.kaggle)
    lines.append(
        f"{same} of {pinned} pins at Kaggle's version in the rehearsal ({env.mode}); "
        f"{local_same} of {pinned} on this machine; Python {platform.python_version()} here"
    )
    return lines if differ else lines[-1:]
