"""The credential scan (kaggle_seg/kernel/credentials.py): this machine's secrets, and any
Kaggle-key-shaped secret of anyone's, in files, wheels and checkpoints; never a false alarm on
what a kernel really ships."""

from __future__ import annotations

import json
import secrets
import zipfile
from pathlib import Path

import pytest
from kernel_helpers import (
    SENTINEL_JSON_KEY,
    SENTINEL_KEY,
    USER,
    all_bytes,
    fake_checkpoint,
    fake_run,
)

from kaggle_seg.errors import KsegError
from kaggle_seg.kernel import build_kernel, check_no_credentials, find_credentials

pytest_plugins = ["kernel_fixtures"]


def someone_elses_key() -> str:
    """A fresh key shaped like Kaggle's (32 hex digits), known to nothing on this machine."""
    return secrets.token_hex(16)


def test_no_credential_anywhere_in_the_build(built: Path):
    for place, data in all_bytes(built):
        assert SENTINEL_KEY.encode() not in data, place
        assert SENTINEL_JSON_KEY.encode() not in data, place
        assert Path(place.split("!")[-1]).name not in ("kaggle.json", "access_token"), place
    # Nor a false alarm: kaggle_seg's and smp's wheels, checkpoints, manifests hold no key shape.
    assert find_credentials(built, [SENTINEL_KEY, SENTINEL_JSON_KEY]) == []


def test_find_credentials_sees_files_and_zip_members(tmp_path: Path):
    (tmp_path / "notes.txt").write_text(f"key={SENTINEL_KEY}\n")
    with zipfile.ZipFile(tmp_path / "pkg.whl", "w") as archive:
        archive.writestr("pkg/settings.py", f"KEY = '{SENTINEL_KEY}'\n")
        archive.writestr("pkg/kaggle.json", "{}")
    (tmp_path / "kaggle.json").write_text("{}")
    problems = find_credentials(tmp_path, [SENTINEL_KEY])
    assert problems == [
        "kaggle.json: a Kaggle credentials file",
        "notes.txt: holds a Kaggle key",
        "pkg.whl!pkg/settings.py: holds a Kaggle key",
        "pkg.whl!pkg/kaggle.json: a Kaggle credentials file",
    ]
    assert all(SENTINEL_KEY not in p for p in problems)


@pytest.mark.parametrize(
    "text",
    [
        '{{"username": "someone", "key": "{key}"}}',  # kaggle.json's content, renamed
        "export KAGGLE_KEY={key}\n",
        "KAGGLE_KEY: '{key}'\n",
        'api_key = "{key}"\n',
        "kaggle:\n  key: {key}\n",
    ],
)
def test_anyones_key_is_found_not_only_this_machines(tmp_path: Path, text: str):
    key = someone_elses_key()
    (tmp_path / "settings.cfg").write_text(text.format(key=key))
    problems = find_credentials(tmp_path, [])  # this machine's own secrets: none
    assert problems == ["settings.cfg: holds a Kaggle key"]
    assert key not in problems[0]


def test_tokens_and_keys_inside_wheels(tmp_path: Path):
    with zipfile.ZipFile(tmp_path / "helper-1.0-py3-none-any.whl", "w") as archive:
        archive.writestr("helper/__init__.py", "TOKEN = 'KGAT_0123456789abcdefABCDEF'\n")
        archive.writestr("helper/config.py", f"KAGGLE_KEY = '{someone_elses_key()}'\n")
    assert find_credentials(tmp_path, []) == [
        "helper-1.0-py3-none-any.whl!helper/__init__.py: holds a Kaggle API token",
        "helper-1.0-py3-none-any.whl!helper/config.py: holds a Kaggle key",
    ]


@pytest.mark.parametrize(
    "text",
    [
        "sha256 key: " + "ab" * 32,  # a longer hex run is a digest, not a key
        "keys: 1, 2, 3\nmodel: 0123456789abcdef",  # 16 hex digits
        "cache_key = '" + "0123456789ABCDEF" * 2 + "'",  # upper case: no Kaggle key
        "monkey business " + "x" * 40 + " " + "a" * 31,
    ],
)
def test_what_only_looks_alike_is_no_alarm(tmp_path: Path, text: str):
    (tmp_path / "notes.txt").write_text(text)
    assert find_credentials(tmp_path, []) == []


def test_a_checkpoint_carrying_someone_elses_key_is_refused(tmp_path: Path, built: Path):
    """A best.pt that holds another user's Kaggle key is never shipped."""
    runs = tmp_path / "runs"
    fake_run(runs, "shared", folds=(0,), postprocess=False)
    config = {"username": "someone", "key": someone_elses_key()}
    fake_checkpoint(runs / "shared" / "fold_0" / "best.pt", "shared", notes={"kaggle": config})
    with pytest.raises(KsegError) as error:
        build_kernel("uwmgi", ["shared"], runs_root=runs, out_root=tmp_path / "kernels",
                     username=USER, wheels_from=built / "wheels")  # fmt: skip
    message = str(error.value)
    assert "\n" not in message
    assert "weights/shared/fold_0/best.pt!" in message and "data.pkl: holds a Kaggle key" in message
    assert config["key"] not in message
    assert list((tmp_path / "kernels").iterdir()) == []  # no kernel, no staging folder


def test_build_refuses_this_machines_key_and_writes_nothing(tmp_path: Path, monkeypatch):
    runs = tmp_path / "runs"
    fake_run(runs, "leaky", folds=(0,), postprocess=False)
    (runs / "leaky" / "fold_0" / "config.yaml").write_text(f"token: {SENTINEL_KEY}\n")
    monkeypatch.setenv("KAGGLE_KEY", SENTINEL_KEY)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(KsegError, match=r"credential.*leaky/fold_0/config.yaml"):
        build_kernel("uwmgi", ["leaky"], runs_root=runs, out_root=tmp_path / "kernels",
                     username=USER, repack=True)  # fmt: skip
    assert list((tmp_path / "kernels").iterdir()) == []  # no kernel, no staging folder


def test_check_no_credentials_is_one_line_naming_the_place(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "kaggle_copy.json").write_text(
        json.dumps({"username": "x", "key": someone_elses_key()})
    )
    with pytest.raises(KsegError) as error:
        check_no_credentials(tmp_path)
    assert "sub/kaggle_copy.json: holds a Kaggle key" in str(error.value)
    assert "\n" not in str(error.value)
    check_no_credentials(tmp_path, skip="sub")  # kseg's own folder (rehearsal/) left out
