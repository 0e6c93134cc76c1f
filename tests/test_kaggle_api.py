"""Publishing through the official kaggle client, against the local fake server (no network)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kaggle_seg.errors import KsegError
from kaggle_seg.kaggle_api import (
    dataset_status,
    kernel_competitions,
    kernel_log,
    kernel_status,
    model_version,
    push_dataset,
    push_kernel,
    submission_status,
    submit_file,
    submit_kernel,
    upload_model,
)
from kaggle_seg.kaggle_client import check_credentials, client_has, kaggle_api

if TYPE_CHECKING:
    from fake_kaggle import FakeKaggle

pytest_plugins = ["fake_kaggle"]  # the fake_kaggle and no_kaggle_credentials fixtures

USERNAME = "kseg-tester"  # the fake's account
# Older clients publish a dataset without a file whose upload failed: kseg refuses them (the
# refusal is tested by test_a_failed_upload_stops_the_push, on any client).
needs_dataset_push = pytest.mark.skipif(
    not client_has("dataset push"), reason="this kaggle client cannot push datasets safely"
)
DATASET = f"{USERNAME}/uwmgi-weights"


def write_json(path: Path, values: object, mode: int = 0o600) -> Path:
    path.write_text(json.dumps(values))
    path.chmod(mode)
    return path


def make_dataset(folder: Path, ref: str = DATASET) -> Path:
    """A dataset folder: metadata, one file, and a sub-folder that must arrive zipped."""
    folder.mkdir()
    write_json(
        folder / "dataset-metadata.json",
        {"id": ref, "title": "UWMGI weights", "licenses": [{"name": "CC0-1.0"}]},
    )
    (folder / "folds.csv").write_text("case_id,fold\ncase1,0\n")
    (folder / "fold_0").mkdir()
    (folder / "fold_0" / "best.pt").write_bytes(b"\x00" * 1000)
    (folder / "fold_0" / "config.yaml").write_text("lr: 0.001\n")
    return folder


def make_kernel(folder: Path, **metadata: object) -> Path:
    folder.mkdir()
    (folder / "kernel.py").write_text("print('predict')\n")
    values = {
        "id": f"{USERNAME}/uwmgi-inference",
        "title": "uwmgi inference",
        "code_file": "kernel.py",
        "language": "python",
        "kernel_type": "script",
        "is_private": True,
        "enable_gpu": True,
        "enable_internet": False,
        "dataset_sources": [DATASET],
        "competition_sources": ["uw-madison-gi-tract-image-segmentation"],
        "kernel_sources": [],
    }
    values.update(metadata)
    write_json(folder / "kernel-metadata.json", values)
    return folder


def assert_one_line(error: pytest.ExceptionInfo[KsegError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    assert message
    return message


# ---- import ----


@pytest.mark.slow
def test_importing_the_module_does_not_import_kaggle() -> None:
    code = (
        "import sys, kaggle_seg.kaggle_api as k; "
        "assert k.check_credentials() == 'dora'; "
        "assert 'kaggle' not in sys.modules and 'kagglesdk' not in sys.modules, "
        "sorted(m for m in sys.modules if m.startswith('kaggle'))"
    )
    env = {**os.environ, "KAGGLE_USERNAME": "dora", "KAGGLE_KEY": "k"}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env=env)


# ---- credentials ----


@pytest.fixture
def config_dir(no_kaggle_credentials: Path) -> Path:
    return no_kaggle_credentials


def test_no_credentials_names_every_way_to_give_them(config_dir: Path) -> None:
    with pytest.raises(KsegError) as error:
        check_credentials()
    message = assert_one_line(error)
    assert "KAGGLE_USERNAME" in message
    assert "KAGGLE_API_TOKEN" in message
    assert str(config_dir) in message


def test_kaggle_json_gives_the_username(config_dir: Path) -> None:
    write_json(config_dir / "kaggle.json", {"username": "alice", "key": "k"})
    assert check_credentials() == "alice"


def test_kaggle_json_open_to_others_asks_for_chmod_600(config_dir: Path) -> None:
    write_json(config_dir / "kaggle.json", {"username": "alice", "key": "k"}, mode=0o644)
    with pytest.raises(KsegError, match="chmod 600"):
        check_credentials()


def test_kaggle_json_not_json(config_dir: Path) -> None:
    (config_dir / "kaggle.json").write_text('{"username": "alice", ')
    (config_dir / "kaggle.json").chmod(0o600)
    with pytest.raises(KsegError, match="not valid JSON"):
        check_credentials()


def test_kaggle_json_without_key(config_dir: Path) -> None:
    write_json(config_dir / "kaggle.json", {"username": "alice"})
    with pytest.raises(KsegError, match="has no key"):
        check_credentials()


def test_environment_variables_win_over_a_broken_kaggle_json(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (config_dir / "kaggle.json").write_text("not json")
    (config_dir / "kaggle.json").chmod(0o644)
    monkeypatch.setenv("KAGGLE_USERNAME", "bob")
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    assert check_credentials() == "bob"


def test_environment_fills_in_what_kaggle_json_lacks(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_json(config_dir / "kaggle.json", {"username": "alice"})
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    assert check_credentials() == "alice"


def test_access_token_is_enough(config_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAGGLE_API_TOKEN", "KGAT_123")
    assert check_credentials() == ""
    monkeypatch.setenv("KAGGLE_USERNAME", "carol")
    assert check_credentials() == "carol"


def test_empty_access_token_file(config_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token_file = config_dir / "token.txt"
    token_file.write_text("\n")
    monkeypatch.setenv("KAGGLE_API_TOKEN", str(token_file))
    with pytest.raises(KsegError, match="empty"):
        check_credentials()


def test_kaggle_api_authenticates_with_an_access_token(
    fake_kaggle: FakeKaggle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    (token,) = fake_kaggle.tokens
    monkeypatch.setenv("KAGGLE_API_TOKEN", token)
    api = kaggle_api()
    assert api.get_config_value("username") == USERNAME
    assert fake_kaggle.calls("IntrospectToken")[-1] == {"token": token}


def test_an_invalid_access_token_is_one_line(
    fake_kaggle: FakeKaggle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    monkeypatch.setenv("KAGGLE_API_TOKEN", "KGAT_revoked")
    with pytest.raises(KsegError) as error:
        kaggle_api()
    assert "invalid or expired" in assert_one_line(error)


def test_a_wrong_key_is_reported_as_rejected_credentials(
    fake_kaggle: FakeKaggle, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KAGGLE_KEY", "wrong-" + fake_kaggle.credentials[USERNAME])
    with pytest.raises(KsegError) as error:
        push_kernel(make_kernel(tmp_path / "kernel"))
    message = assert_one_line(error)
    assert "HTTP 401" in message
    assert "credentials" in message


# ---- datasets ----


@needs_dataset_push
def test_push_creates_an_absent_dataset_with_folders_zipped(
    fake_kaggle: FakeKaggle, tmp_path: Path
) -> None:
    folder = make_dataset(tmp_path / "weights")
    url = push_dataset(folder, "first")
    assert url.endswith(f"/datasets/{DATASET}")
    assert "CreateDatasetVersion" not in fake_kaggle.endpoints()
    (create,) = fake_kaggle.calls("CreateDataset")
    assert create["ownerSlug"] == USERNAME
    assert create["slug"] == "uwmgi-weights"
    assert create["title"] == "UWMGI weights"
    assert create["licenseName"] == "CC0-1.0"
    assert create["isPrivate"] is True
    uploaded = fake_kaggle.uploaded()
    assert set(uploaded) == {"folds.csv", "fold_0.zip"}
    assert {file["token"] for file in create["files"]} == {u.token for u in uploaded.values()}
    assert uploaded["folds.csv"].data == (folder / "folds.csv").read_bytes()
    with zipfile.ZipFile(io.BytesIO(uploaded["fold_0.zip"].data)) as archive:
        assert sorted(archive.namelist()) == ["best.pt", "config.yaml"]
        assert archive.read("best.pt") == b"\x00" * 1000


@needs_dataset_push
def test_push_public_dataset(fake_kaggle: FakeKaggle, tmp_path: Path) -> None:
    push_dataset(make_dataset(tmp_path / "weights"), public=True)
    (create,) = fake_kaggle.calls("CreateDataset")
    assert not create.get("isPrivate")


@needs_dataset_push
def test_push_versions_an_existing_dataset(fake_kaggle: FakeKaggle, tmp_path: Path) -> None:
    fake_kaggle.add_dataset(DATASET)
    url = push_dataset(make_dataset(tmp_path / "weights"), "fold 0 retrained")
    assert url.endswith(f"/datasets/{DATASET}")
    assert "CreateDataset" not in fake_kaggle.endpoints()
    (version,) = fake_kaggle.calls("CreateDatasetVersion")
    assert version["ownerSlug"] == USERNAME
    assert version["datasetSlug"] == "uwmgi-weights"
    assert version["body"]["versionNotes"] == "fold 0 retrained"
    assert len(version["body"]["files"]) == 2
    assert set(fake_kaggle.uploaded()) == {"folds.csv", "fold_0.zip"}


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (None, "not found"),
        ({"title": "UWMGI weights", "licenses": [{"name": "CC0-1.0"}]}, "id must be 'user/slug'"),
        ({"id": "no-slash", "title": "t", "licenses": [{"name": "CC0-1.0"}]}, "id must be"),
        ({"id": DATASET, "licenses": [{"name": "CC0-1.0"}]}, "title is missing"),
        ({"id": DATASET, "title": "UWMGI weights"}, "licenses"),
    ],
)
def test_dataset_metadata_problems_are_named_before_any_request(
    fake_kaggle: FakeKaggle, tmp_path: Path, metadata: dict | None, expected: str
) -> None:
    folder = make_dataset(tmp_path / "weights")
    if metadata is None:
        (folder / "dataset-metadata.json").unlink()
    else:
        write_json(folder / "dataset-metadata.json", metadata)
    with pytest.raises(KsegError, match=expected):
        push_dataset(folder)
    assert fake_kaggle.requests == []


def test_a_failed_upload_stops_the_push(fake_kaggle: FakeKaggle, tmp_path: Path) -> None:
    fake_kaggle.fail("upload", 500, "storage unavailable")
    folder = make_dataset(tmp_path / "weights")
    with pytest.raises(KsegError) as error:
        push_dataset(folder)
    message = assert_one_line(error)
    # kseg's contract, whatever the client's own wording: the push stops, the one line names
    # the dataset, and no dataset or version was created. A client that raises on a failed
    # upload (2.2.5+) names the file; an older one, which would publish without the file, is
    # refused before anything is sent.
    assert DATASET in message
    if client_has("dataset push"):
        uploaded = {"folds.csv", "fold_0.zip"}
        assert any(name in message for name in uploaded), message
    else:
        assert "kaggle>=2.2.5" in message
        assert fake_kaggle.requests == []
    assert "CreateDataset" not in fake_kaggle.endpoints()
    assert "CreateDatasetVersion" not in fake_kaggle.endpoints()


def test_dataset_status_follows_kaggle_processing(fake_kaggle: FakeKaggle) -> None:
    assert dataset_status(DATASET) == "missing"
    fake_kaggle.add_dataset(DATASET)
    fake_kaggle.dataset_progress[DATASET] = ["BLOBS_RECEIVED", "READY"]
    assert [dataset_status(DATASET), dataset_status(DATASET)] == ["blobs_received", "ready"]


@needs_dataset_push
def test_api_500_gives_status_and_message(fake_kaggle: FakeKaggle, tmp_path: Path) -> None:
    fake_kaggle.fail("CreateDataset", 500, "dataset quota exceeded")
    with pytest.raises(KsegError) as error:
        push_dataset(make_dataset(tmp_path / "weights"))
    message = assert_one_line(error)
    assert "HTTP 500" in message
    assert "dataset quota exceeded" in message
    assert "CreateDataset" in message


@needs_dataset_push
def test_api_500_without_json_body(fake_kaggle: FakeKaggle, tmp_path: Path) -> None:
    fake_kaggle.fail("GetDatasetStatus", 503, "backend down")
    with pytest.raises(KsegError, match=r"HTTP 503 .*backend down"):
        push_dataset(make_dataset(tmp_path / "weights"))


# ---- kernels ----


def test_push_kernel_sends_the_metadata(fake_kaggle: FakeKaggle, tmp_path: Path) -> None:
    folder = make_kernel(tmp_path / "kernel")
    pushed = push_kernel(folder)
    assert pushed.url.endswith(f"/code/{USERNAME}/uwmgi-inference")
    assert pushed.version == 1
    (saved,) = fake_kaggle.calls("SaveKernel")
    assert saved["slug"] == f"{USERNAME}/uwmgi-inference"
    assert saved["newTitle"] == "uwmgi inference"
    assert saved["text"] == "print('predict')\n"
    assert saved["language"] == "python"
    assert saved["kernelType"] == "script"
    assert saved["isPrivate"] is True
    assert saved["enableGpu"] is True
    assert saved["enableInternet"] is False
    assert saved["datasetDataSources"] == [DATASET]
    assert saved["competitionDataSources"] == ["uw-madison-gi-tract-image-segmentation"]
    assert fake_kaggle.requests[0].user == USERNAME
    assert "machineShape" not in saved  # none in the metadata: none is sent


def test_push_kernel_sends_the_machine_shape(fake_kaggle: FakeKaggle, tmp_path: Path) -> None:
    folder = make_kernel(tmp_path / "kernel", machine_shape="NvidiaTeslaT4")
    assert push_kernel(folder).version == 1
    assert push_kernel(folder).version == 2
    shapes = [call["machineShape"] for call in fake_kaggle.calls("SaveKernel")]
    assert shapes == ["NvidiaTeslaT4", "NvidiaTeslaT4"]


def test_kernel_status_log_and_competitions(fake_kaggle: FakeKaggle, tmp_path: Path) -> None:
    push_kernel(make_kernel(tmp_path / "kernel"))
    kernel = f"{USERNAME}/uwmgi-inference"
    fake_kaggle.kernel_progress[kernel] = [("RUNNING", None), ("ERROR", "exit code 1")]
    fake_kaggle.kernel_logs[kernel] = "installing\nerror: postprocess.json: invalid\n"
    running = kernel_status(kernel, 1)
    assert (running.status, running.failure) == ("running", None)
    failed = kernel_status(kernel, 1)
    assert (failed.status, failed.failure) == ("error", "exit code 1")
    asked = {call.get("versionLabel") for call in fake_kaggle.calls("GetKernelSessionStatus")}
    assert asked == ({"v1"} if client_has("kernel version") else {None})
    assert kernel_log(kernel, 1) == "installing\nerror: postprocess.json: invalid\n"
    assert kernel_competitions(kernel) == ["uw-madison-gi-tract-image-segmentation"]
    with pytest.raises(KsegError, match="owner/kernel-slug"):
        kernel_status("uwmgi-inference")


def test_push_kernel_rejected_sources_are_an_error(fake_kaggle: FakeKaggle, tmp_path: Path) -> None:
    fake_kaggle.reply(
        "SaveKernel",
        {"url": "http://fake/code/k", "versionNumber": 2, "invalidDatasetSources": [DATASET]},
    )
    with pytest.raises(KsegError) as error:
        push_kernel(make_kernel(tmp_path / "kernel"))
    message = assert_one_line(error)
    assert DATASET in message
    assert "http://fake/code/k" in message


def test_push_kernel_error_in_the_answer(fake_kaggle: FakeKaggle, tmp_path: Path) -> None:
    fake_kaggle.reply("SaveKernel", {"error": "Notebook not found"})
    with pytest.raises(KsegError, match="Notebook not found"):
        push_kernel(make_kernel(tmp_path / "kernel"))


def test_push_kernel_client_validation_is_one_line(fake_kaggle: FakeKaggle, tmp_path: Path) -> None:
    with pytest.raises(KsegError) as error:
        push_kernel(make_kernel(tmp_path / "kernel", language="julia"))
    assert "valid language" in assert_one_line(error)
    with pytest.raises(KsegError, match=r"kernel-metadata\.json not found"):
        push_kernel(tmp_path)


# ---- submissions ----


def test_submit_file_uploads_the_csv_and_submits_it(
    fake_kaggle: FakeKaggle, tmp_path: Path
) -> None:
    csv = tmp_path / "submission.csv"
    csv.write_text("ImageId,EncodedPixels\nabc,1 3\n")
    message = submit_file("data-science-bowl-2018", csv, "unet fold 0-4")
    assert message == "Successfully submitted to data-science-bowl-2018"
    assert fake_kaggle.endpoints() == ["StartSubmissionUpload", "upload", "CreateSubmission"]
    (start,) = fake_kaggle.calls("StartSubmissionUpload")
    assert start["fileName"] == "submission.csv"
    assert start["contentLength"] == csv.stat().st_size
    upload = fake_kaggle.uploaded()["submission.csv"]
    assert upload.data == csv.read_bytes()
    (submit,) = fake_kaggle.calls("CreateSubmission")
    assert submit == {
        "competitionName": "data-science-bowl-2018",
        "blobFileTokens": upload.token,
        "submissionDescription": "unet fold 0-4",
    }


def test_submit_file_failed_upload(fake_kaggle: FakeKaggle, tmp_path: Path) -> None:
    csv = tmp_path / "submission.csv"
    csv.write_text("ImageId,EncodedPixels\n")
    fake_kaggle.fail("upload", 403, "denied")
    with pytest.raises(KsegError, match="nothing was submitted"):
        submit_file("data-science-bowl-2018", csv, "x")
    assert "CreateSubmission" not in fake_kaggle.endpoints()


def test_submit_file_missing(fake_kaggle: FakeKaggle, tmp_path: Path) -> None:
    with pytest.raises(KsegError, match="not found"):
        submit_file("data-science-bowl-2018", tmp_path / "nope.csv", "x")


def test_submit_kernel_names_kernel_and_version(fake_kaggle: FakeKaggle) -> None:
    competition = "uw-madison-gi-tract-image-segmentation"
    kernel = f"{USERNAME}/uwmgi-inference"
    submitted = submit_kernel(competition, kernel, "ensemble v3", version=3)
    assert competition in submitted.message
    assert submission_status(competition, submitted.ref).status == "complete"
    assert submission_status(competition, 999) is None
    submit_kernel(competition, kernel, "latest", file_name="out.csv")
    first, latest = fake_kaggle.calls("CreateCodeSubmission")
    assert first == {
        "competitionName": competition,
        "kernelOwner": USERNAME,
        "kernelSlug": "uwmgi-inference",
        "kernelVersion": 3,
        "fileName": "submission.csv",
        "submissionDescription": "ensemble v3",
    }
    assert "kernelVersion" not in latest
    assert latest["fileName"] == "out.csv"


def test_submit_kernel_needs_owner_and_slug(fake_kaggle: FakeKaggle) -> None:
    with pytest.raises(KsegError, match="owner/kernel-slug"):
        submit_kernel("uw-madison-gi-tract-image-segmentation", "uwmgi-inference", "x")


def test_submit_to_an_unknown_competition(fake_kaggle: FakeKaggle, tmp_path: Path) -> None:
    csv = tmp_path / "submission.csv"
    csv.write_text("id,class,predicted\n")
    fake_kaggle.fail("StartSubmissionUpload", 404, "Competition not found")
    with pytest.raises(KsegError, match=r"HTTP 404 .*Competition not found"):
        submit_file("no-such-competition", csv, "x")


# ---- models ----


def make_weights(folder: Path) -> Path:
    """An experiment's weights as a kernel ships them, folders included."""
    (folder / "exp" / "fold_0").mkdir(parents=True)
    (folder / "exp" / "fold_0" / "best.pt").write_bytes(b"\x01" * 100)
    (folder / "exp" / "postprocess.json").write_text("{}")
    (folder / "kseg-weights.json").write_text("{}")
    return folder


def test_upload_model_creates_model_instance_then_versions(
    fake_kaggle: FakeKaggle, tmp_path: Path
) -> None:
    handle = f"{USERNAME}/uwmgi-weights/pyTorch/default"
    folder = make_weights(tmp_path / "weights")
    assert model_version(handle) is None
    assert upload_model(handle, folder, "Apache 2.0", "first") == 1
    (create,) = fake_kaggle.calls("CreateModel")
    assert (create["ownerSlug"], create["slug"]) == (USERNAME, "uwmgi-weights")
    (instance,) = fake_kaggle.calls("CreateModelInstance")
    assert instance["body"]["instanceSlug"] == "default"
    assert instance["body"]["licenseName"] == "Apache 2.0"
    # Folders are kept: the kernel finds <exp>/fold_0/best.pt where it was.
    (exp,) = instance["body"]["directories"]
    assert exp["name"] == "exp" and exp["directories"][0]["name"] == "fold_0"
    assert set(fake_kaggle.uploaded()) == {"best.pt", "postprocess.json", "kseg-weights.json"}
    assert upload_model(handle, folder, "Apache 2.0", "second") == 2
    (version,) = fake_kaggle.calls("CreateModelInstanceVersion")
    assert version["body"]["versionNotes"] == "second"
    assert len(fake_kaggle.calls("CreateModel")) == 1


def test_a_failed_model_upload_creates_nothing(fake_kaggle: FakeKaggle, tmp_path: Path) -> None:
    fake_kaggle.fail("upload", 500, "storage unavailable")
    handle = f"{USERNAME}/uwmgi-weights/pyTorch/default"
    with pytest.raises(KsegError) as error:
        upload_model(handle, make_weights(tmp_path / "weights"), "Apache 2.0", "x")
    assert handle in assert_one_line(error)
    assert "CreateModelInstance" not in fake_kaggle.endpoints()


# ---- network ----


def test_network_failure_is_one_line(fake_kaggle: FakeKaggle, tmp_path: Path) -> None:
    fake_kaggle.stop()
    csv = tmp_path / "submission.csv"
    csv.write_text("id,class,predicted\n")
    calls = [
        lambda: dataset_status(DATASET),
        lambda: push_kernel(make_kernel(tmp_path / "kernel")),
        lambda: submit_file("data-science-bowl-2018", csv, "x"),
        lambda: submit_kernel("uwmgi", f"{USERNAME}/uwmgi-inference", "x"),
    ]
    if client_has("dataset push"):
        calls.append(lambda: push_dataset(make_dataset(tmp_path / "weights")))
    for publish in calls:
        with pytest.raises(KsegError) as error:
            publish()
        message = assert_one_line(error)
        assert "network" in message
        assert fake_kaggle.url in message
