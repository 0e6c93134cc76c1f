"""Publishing a built kernel against the fake Kaggle API (kaggle_seg/kernel/publish.py and the
`kseg kernel push|status|wait`, `kseg dataset push`, `kseg model push` and `kseg submit
--kernel` commands): the order of things, each wait, and each failure as one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from kernel_helpers import USER, fake_run, load
from typer.testing import CliRunner

from kaggle_seg.cli import app
from kaggle_seg.kaggle_client import client_has
from kaggle_seg.kernel import build_kernel

if TYPE_CHECKING:
    from fake_kaggle import FakeKaggle

pytest_plugins = ["fake_kaggle", "kernel_fixtures"]

KERNEL = f"{USER}/kseg-uwmgi-tiny-unet"
WHEELS = f"{KERNEL}-wheels"
WEIGHTS = f"{KERNEL}-weights"
COMPETITION = "uw-madison-gi-tract-image-segmentation"
FAST = ["--poll", "0.01"]
# Older clients publish a dataset without a file whose upload failed: kseg refuses them.
needs_dataset_push = pytest.mark.skipif(
    not client_has("dataset push"), reason="this kaggle client cannot push datasets safely"
)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def one_line_error(result) -> str:
    assert result.exit_code != 0, result.output
    message = str(result.exception)
    assert message and "\n" not in message, message
    return message


@pytest.fixture
def kernel(built: Path, tmp_path: Path) -> Path:
    """A copy of the built kernel (datasets as weights), to push."""
    return shutil.copytree(built, tmp_path / built.name)


@pytest.fixture
def pushed(kernel: Path, fake_kaggle: FakeKaggle) -> Path:
    """The kernel pushed once, its datasets already on Kaggle."""
    fake_kaggle.add_dataset(WHEELS)
    fake_kaggle.add_dataset(WEIGHTS)
    result = invoke("kernel", "push", str(kernel))
    assert result.exit_code == 0, result.output
    return kernel


@needs_dataset_push
def test_push_datasets_then_kernel(kernel: Path, fake_kaggle: FakeKaggle):
    for part in ("wheels", "weights"):
        result = invoke("dataset", "push", str(kernel / part), "--message", "v1")
        assert result.exit_code == 0, result.output
    created = {call["slug"]: call for call in fake_kaggle.calls("CreateDataset")}
    assert set(created) == {"kseg-uwmgi-tiny-unet-wheels", "kseg-uwmgi-tiny-unet-weights"}
    uploaded = set(fake_kaggle.uploaded())
    assert "tiny_unet.zip" in uploaded  # the experiment folder, zipped (Kaggle unpacks it)
    assert any(name.startswith("kaggle_seg-") for name in uploaded)

    result = invoke("kernel", "push", str(kernel))
    assert result.exit_code == 0, result.output
    assert f"pushed {KERNEL} version 1" in result.output
    (saved,) = fake_kaggle.calls("SaveKernel")
    assert saved["enableInternet"] is False
    assert saved["slug"] == KERNEL
    assert saved["machineShape"] == "NvidiaTeslaT4"  # never a bare enable_gpu
    assert saved["datasetDataSources"] == load(kernel / "kernel-metadata.json")["dataset_sources"]
    assert "--no-index" in saved["text"]
    assert load(kernel / "kseg-kernel.json")["pushed"]["version"] == 1


@needs_dataset_push
def test_dataset_push_can_wait_until_kaggle_has_processed_it(kernel: Path, fake_kaggle: FakeKaggle):
    fake_kaggle.dataset_progress[WEIGHTS] = ["BLOBS_RECEIVED", "READY"]
    result = invoke("dataset", "push", str(kernel / "weights"), "--wait", *FAST)
    assert result.exit_code == 0, result.output
    progress = [line.split(" (")[0] for line in result.output.splitlines() if "dataset " in line]
    assert progress == [f"dataset {WEIGHTS}: blobs_received", f"dataset {WEIGHTS}: ready"]
    assert fake_kaggle.endpoints()[-1] == "GetDatasetStatus"


def test_kernel_push_waits_until_its_datasets_are_ready(kernel: Path, fake_kaggle: FakeKaggle):
    for ref in (WHEELS, WEIGHTS):
        fake_kaggle.add_dataset(ref)
    fake_kaggle.dataset_progress[WEIGHTS] = ["BLOBS_RECEIVED", "BLOBS_DECOMPRESSED", "READY"]
    result = invoke("kernel", "push", str(kernel), *FAST)
    assert result.exit_code == 0, result.output
    progress = [line.split(" (")[0] for line in result.output.splitlines() if "dataset" in line]
    assert progress == [
        f"dataset {WHEELS}: ready",
        f"dataset {WEIGHTS}: blobs_received",
        f"dataset {WEIGHTS}: blobs_decompressed",
        f"dataset {WEIGHTS}: ready",
    ]
    endpoints = fake_kaggle.endpoints()
    assert endpoints.index("SaveKernel") > max(
        i for i, e in enumerate(endpoints) if e == "GetDatasetStatus"
    )


def test_a_dataset_that_never_becomes_ready_times_out(kernel: Path, fake_kaggle: FakeKaggle):
    fake_kaggle.add_dataset(WHEELS)
    fake_kaggle.add_dataset(WEIGHTS)
    fake_kaggle.dataset_progress[WHEELS] = ["BLOBS_RECEIVED"]
    result = invoke("kernel", "push", str(kernel), "--timeout", "0.05", *FAST)
    message = one_line_error(result)
    assert message.startswith(f"dataset {WHEELS}: still blobs_received after ")
    assert "(timeout 0 s)" in message
    assert "SaveKernel" not in fake_kaggle.endpoints()


@pytest.mark.parametrize(
    ("progress", "expected"),
    [(None, "is not on Kaggle: push it first"), (["FAILED"], "could not process")],
)
def test_a_missing_or_failed_dataset_stops_the_push(
    kernel: Path, fake_kaggle: FakeKaggle, progress, expected: str
):
    fake_kaggle.add_dataset(WEIGHTS)
    if progress:
        fake_kaggle.add_dataset(WHEELS)
        fake_kaggle.dataset_progress[WHEELS] = progress
    message = one_line_error(invoke("kernel", "push", str(kernel), *FAST))
    assert WHEELS in message and expected in message
    assert "SaveKernel" not in fake_kaggle.endpoints()


@needs_dataset_push
def test_push_with_datasets_and_wait_in_one_command(kernel: Path, fake_kaggle: FakeKaggle):
    fake_kaggle.kernel_progress[KERNEL] = [("QUEUED", None), ("RUNNING", None), ("COMPLETE", None)]
    result = invoke("kernel", "push", str(kernel), "--with-datasets", "--wait", *FAST)
    assert result.exit_code == 0, result.output
    endpoints = fake_kaggle.endpoints()
    assert endpoints.count("CreateDataset") == 2
    assert endpoints.index("CreateDataset") < endpoints.index("SaveKernel")
    statuses = [line.split(": ")[1].split(" (")[0] for line in result.output.splitlines()
                if line.startswith(f"kernel {KERNEL} version 1: ")]  # fmt: skip
    assert statuses == ["queued", "running", "complete"]


def test_a_kernel_version_that_errors_shows_its_log_tail(pushed: Path, fake_kaggle: FakeKaggle):
    fake_kaggle.kernel_progress[KERNEL] = [("RUNNING", None), ("ERROR", "")]
    log = [f"step {i}" for i in range(40)] + ["error: weights/tiny_unet/postprocess.json: invalid"]
    fake_kaggle.kernel_logs[KERNEL] = "\n".join(log)
    result = invoke("kernel", "wait", str(pushed), *FAST)
    message = one_line_error(result)
    assert message == (
        f"kernel {KERNEL} version 1 ended with error: "
        "error: weights/tiny_unet/postprocess.json: invalid"
    )
    shown = [line[4:] for line in result.output.splitlines() if line.startswith("  | ")]
    assert shown == log[-30:]
    # Kaggle's own failure message, when it gives one, is the cause.
    fake_kaggle.kernel_progress[KERNEL] = [("ERROR", "Your notebook hit the 9 hour limit")]
    message = one_line_error(invoke("kernel", "status", str(pushed)))
    assert message.endswith("ended with error: Your notebook hit the 9 hour limit")


def test_kernel_status_of_a_finished_version(pushed: Path, fake_kaggle: FakeKaggle):
    result = invoke("kernel", "status", str(pushed))
    assert result.exit_code == 0, result.output
    assert f"kernel {KERNEL} version 1: complete" in result.output


def test_submit_the_pushed_version_without_predicting(
    pushed: Path, fake_kaggle: FakeKaggle, tmp_path: Path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    result = invoke("submit", "--kernel", str(pushed), "--message", "tiny unet v1")
    assert result.exit_code == 0, result.output
    (submitted,) = fake_kaggle.calls("CreateCodeSubmission")
    assert submitted == {
        "competitionName": COMPETITION,
        "kernelOwner": USER,
        "kernelSlug": KERNEL.split("/")[1],
        "kernelVersion": 1,
        "fileName": "submission.csv",
        "submissionDescription": "tiny unet v1",
    }
    (entry,) = load(pushed / "kseg-kernel.json")["submissions"]
    assert (entry["version"], entry["submission"]) == (1, 4343)
    logged = (tmp_path / "submissions" / "kernel_submissions.jsonl").read_text().splitlines()
    assert json.loads(logged[0])["kernel"] == KERNEL


def test_submit_refuses_a_version_that_has_not_finished(pushed: Path, fake_kaggle: FakeKaggle):
    fake_kaggle.kernel_progress[KERNEL] = [("RUNNING", None)]
    message = one_line_error(invoke("submit", "--kernel", str(pushed)))
    assert "version 1 is running, not complete" in message and "--wait" in message
    assert "CreateCodeSubmission" not in fake_kaggle.endpoints()


def test_submit_by_owner_and_slug_finds_the_competition_on_kaggle(
    pushed: Path, fake_kaggle: FakeKaggle, tmp_path: Path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    result = invoke("submit", "--kernel", KERNEL, "--version", "1")
    assert result.exit_code == 0, result.output
    assert "GetKernel" in fake_kaggle.endpoints()
    (submitted,) = fake_kaggle.calls("CreateCodeSubmission")
    assert (submitted["competitionName"], submitted["kernelVersion"]) == (COMPETITION, 1)


def test_submit_waits_for_the_score(pushed: Path, fake_kaggle: FakeKaggle, tmp_path, monkeypatch):
    from kaggle_seg.submit import submit_pushed_kernel

    monkeypatch.chdir(tmp_path)
    fake_kaggle.kernel_progress[KERNEL] = [("RUNNING", None), ("COMPLETE", None)]
    fake_kaggle.submission_progress[4343] = [("PENDING", None), ("COMPLETE", "0.8712")]
    said: list[str] = []
    result = submit_pushed_kernel(str(pushed), None, "v1", wait=True, poll_s=0.01, say=said.append)
    assert result == f"submission 4343 to {COMPETITION} scored 0.8712 (public)"
    assert any("running" in line for line in said) and any("pending" in line for line in said)
    fake_kaggle.submission_progress[4344] = [("ERROR", "Submission Scoring Error")]
    from kaggle_seg.errors import KsegError

    with pytest.raises(KsegError, match="Submission Scoring Error"):
        submit_pushed_kernel(str(pushed), None, "v2", wait=True, poll_s=0.01, say=said.append)


def test_a_p100_in_the_metadata_is_refused_before_any_request(
    kernel: Path, fake_kaggle: FakeKaggle
):
    meta = load(kernel / "kernel-metadata.json")
    meta["machine_shape"] = "NvidiaTeslaP100"
    (kernel / "kernel-metadata.json").write_text(json.dumps(meta))
    message = one_line_error(invoke("kernel", "push", str(kernel)))
    assert "P100" in message and "CUDA" in message
    assert fake_kaggle.requests == []


def test_push_refuses_a_folder_with_credentials(built: Path, fake_kaggle: FakeKaggle, tmp_path):
    wheels = shutil.copytree(built / "wheels", tmp_path / "wheels")
    (wheels / "kaggle.json").write_text("{}")
    result = invoke("dataset", "push", str(wheels))
    assert result.exit_code != 0
    assert "credentials" in str(result.exception)
    assert fake_kaggle.requests == []


# ---- Kaggle Models ----


@pytest.fixture
def model_kernel(built: Path, tmp_path: Path) -> Path:
    fake_run(tmp_path / "runs", "tiny_unet", folds=(0,))
    return build_kernel("uwmgi", ["tiny_unet"], runs_root=tmp_path / "runs",
                        out_root=tmp_path / "kernels", username=USER, weights_as="model",
                        model="uwmgi-tiny", wheels_from=built / "wheels").kernel_dir  # fmt: skip


def test_model_push_then_kernel_push(model_kernel: Path, fake_kaggle: FakeKaggle):
    handle = f"{USER}/uwmgi-tiny/pyTorch/default"
    message = one_line_error(invoke("kernel", "push", str(model_kernel)))
    assert "not pushed yet: kseg model push" in message
    result = invoke("model", "push", str(model_kernel), "--message", "fold 0")
    assert result.exit_code == 0, result.output
    assert f"pushed model {handle}/1" in result.output
    assert load(model_kernel / "kernel-metadata.json")["model_sources"] == [f"{handle}/1"]
    (instance,) = fake_kaggle.calls("CreateModelInstance")
    assert [d["name"] for d in instance["body"]["directories"]] == ["tiny_unet"]
    fake_kaggle.add_dataset(f"{USER}/kseg-uwmgi-tiny-unet-wheels")
    result = invoke("kernel", "push", str(model_kernel))
    assert result.exit_code == 0, result.output
    (saved,) = fake_kaggle.calls("SaveKernel")
    assert saved["modelDataSources"] == [f"{handle}/1"]
    assert saved["datasetDataSources"] == [f"{USER}/kseg-uwmgi-tiny-unet-wheels"]


def test_model_push_of_an_experiment_folder(fake_kaggle: FakeKaggle, tmp_path: Path):
    run_dir = fake_run(tmp_path / "runs", "tiny_unet", folds=(0, 1))
    result = invoke("model", "push", str(run_dir), "--model", "uwmgi-unet", "--folds", "1")
    assert result.exit_code == 0, result.output
    assert f"pushed model {USER}/uwmgi-unet/pyTorch/default/1" in result.output
    uploaded = set(fake_kaggle.uploaded())
    assert uploaded == {"best.pt", "config.yaml", "postprocess.json", "kseg-weights.json"}
    (instance,) = fake_kaggle.calls("CreateModelInstance")
    (experiment,) = instance["body"]["directories"]
    assert [d["name"] for d in experiment["directories"]] == ["fold_1"]  # last.pt never goes
