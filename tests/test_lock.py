"""The lock (requirements/lock.txt) pins every dependency pyproject.toml names, at a version that
pyproject's own specifiers accept: a dependency added to pyproject but not to the lock would be
installed unpinned by the README's commands and by .ci/run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the lock is compiled for 3.11

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"


def read_lock(path: Path) -> dict[str, Version]:
    """`name==version` lines of a pip-compile output, by canonical name."""
    pins: dict[str, Version] = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if match:
            pins[canonicalize_name(match[1])] = Version(match[2])
    return pins


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        listed += extra
    return [Requirement(text) for text in listed]


def test_the_lock_pins_every_project_dependency_within_its_specifier() -> None:
    pins = read_lock(LOCK)
    missing, outside = [], []
    for requirement in project_requirements():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        if name not in pins:
            missing.append(requirement.name)
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            outside.append(f"{requirement} (lock: {pins[name]})")
    refresh = "refresh the lock (README, 'The lock')"
    assert not missing, f"pyproject.toml names {missing}, which {LOCK.name} lacks: {refresh}"
    assert not outside, f"{LOCK.name} pins versions pyproject.toml refuses: {outside}: {refresh}"


def test_the_lock_says_how_it_was_made() -> None:
    header = LOCK.read_text()[:2000]
    assert "pip-compile" in header and "pyproject.toml" in header


def test_read_lock_finds_pins_and_skips_comments(tmp_path: Path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text("# via x\nNumPy==2.4.6\n    # via pandas\nruamel.yaml==0.18.1 \\\n")
    assert read_lock(lock) == {"numpy": Version("2.4.6"), "ruamel-yaml": Version("0.18.1")}
