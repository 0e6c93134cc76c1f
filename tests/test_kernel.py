"""Offline Kaggle kernels: build (metadata, wheels, weights, no credentials), rehearse (Kaggle
image only, no network, read-only inputs), and the push commands against the fake Kaggle API."""

from __future__ import annotations

import ast
import json
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kaggle_seg.errors import KsegError
from kaggle_seg.kernel import (
    SOCKET_GUARD,
    build_kernel,
    check_kernel_metadata,
    check_title,
    diagnose,
    estimate_run_time,
    expose_image_packages,
    find_credentials,
    make_kaggle_venv,
    plan_dependency_wheels,
    read_kaggle_image,
    repack_installed,
    resolve_isolation,
    slugify,
    submit_parameters,
)

if TYPE_CHECKING:
    from fake_kaggle import FakeKaggle

pytest_plugins = ["fake_kaggle"]  # the fake_kaggle fixture

USER = "kseg-tester"  # the fake Kaggle server's account
SENTINEL_KEY = "SENTINEL-kaggle-key-5f0c2d9e7a41"  # $KAGGLE_KEY while building
SENTINEL_JSON_KEY = "SENTINEL-json-key-93b1e0aa6c27"  # the key in ~/.kaggle/kaggle.json
ROOT = Path(__file__).resolve().parents[1]
IMAGE_FILE = ROOT / "kernels" / "kaggle_image.txt"


def kseg(*args: str, env: dict[str, str] | None = None, timeout: float = 600):
    return subprocess.run(
        [sys.executable, "-m", "kaggle_seg", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment without Kaggle credentials or config, HOME moved to `home`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("KAGGLE_") and k not in ("XDG_CONFIG_HOME",)
    }
    env["HOME"] = str(home)
    env.update(extra)
    return env


def fake_run(runs: Path, experiment: str, folds=(0, 1), postprocess: bool = True) -> Path:
    """runs/<exp>/fold_<k>/ with stand-in files (build only copies them)."""
    for k in folds:
        fold = runs / experiment / f"fold_{k}"
        fold.mkdir(parents=True)
        (fold / "best.pt").write_bytes(b"best weights %d" % k)
        (fold / "last.pt").write_bytes(b"optimizer state")
        (fold / "config.yaml").write_text(f"name: {experiment}\n")
        (fold / "history.csv").write_text("epoch,score\n1,0.5\n")
    if postprocess:
        (runs / experiment / "postprocess.json").write_text('{"classes": {}}\n')
    return runs / experiment


def all_bytes(folder: Path):
    """(place, bytes) of every file under `folder` and of every member of its zip files."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        yield str(path), path.read_bytes()
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for name in archive.namelist():
                    yield f"{path}!{name}", archive.read(name)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`kseg kernel build` as a user runs it: the username from ~/.kaggle/kaggle.json, a
    sentinel $KAGGLE_KEY, dependency wheels rebuilt from this environment (offline)."""
    root = tmp_path_factory.mktemp("kernel_build")
    home = root / "home"
    (home / ".kaggle").mkdir(parents=True)
    kaggle_json = home / ".kaggle" / "kaggle.json"
    kaggle_json.write_text(json.dumps({"username": USER, "key": SENTINEL_JSON_KEY}))
    kaggle_json.chmod(0o600)
    fake_run(root / "runs", "tiny_unet")
    env = clean_env(home, KAGGLE_KEY=SENTINEL_KEY)
    result = kseg(
        "kernel", "build", "--competition", "uwmgi", "--experiment", "tiny_unet",
        "--runs-dir", str(root / "runs"), "--out-dir", str(root / "kernels"),
        "--repack-installed", "--tta", "flip", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "wheels" in result.stdout and "MB" in result.stdout
    (kernel_dir,) = (root / "kernels").iterdir()
    return kernel_dir


def load(path: Path) -> dict:
    return json.loads(path.read_text())


# ---- build --------------------------------------------------------------------------------------


def test_kernel_metadata_is_what_kaggle_needs(built: Path):
    meta = load(built / "kernel-metadata.json")
    assert meta["id"] == f"{USER}/kseg-uwmgi-tiny-unet"  # user from kaggle.json
    assert len(meta["title"]) >= 5
    assert meta["id"].split("/")[1] == slugify(meta["title"])
    # The client defaults the internet to on when the key is absent; it must be the string.
    assert meta["enable_internet"] == "false"
    assert meta["language"] == "python"
    assert meta["kernel_type"] == "script"
    assert meta["enable_gpu"] == "true"
    assert meta["competition_sources"] == ["uw-madison-gi-tract-image-segmentation"]
    wheels_id = load(built / "wheels" / "dataset-metadata.json")["id"]
    weights_id = load(built / "weights" / "dataset-metadata.json")["id"]
    assert meta["dataset_sources"] == [wheels_id, weights_id]
    assert (built / meta["code_file"]).is_file()
    check_kernel_metadata(meta, "uwmgi")


def test_title_slug_agrees_with_the_kaggle_client():
    slugify_lib = pytest.importorskip("slugify").slugify  # what `kaggle kernels push` uses
    for title in ("kseg uwmgi tiny_unet", "UWMGI  25D-effnet b3", "kseg dsb2018 unet128"):
        assert slugify(title) == slugify_lib(title)
        assert check_title(title) == slugify(title)
    for bad in ("abc", "uw: mgi?", "x" * 51):
        with pytest.raises(KsegError, match="title"):
            check_title(bad)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"enable_internet": "true"}, "enable_internet"),
        ({"enable_internet": False}, "enable_internet"),
        ({"title": "another title"}, "slug"),
        ({"competition_sources": []}, "competition_sources"),
        ({"dataset_sources": ["no-slash"]}, "dataset source"),
    ],
)
def test_kernel_metadata_problems_are_named(built: Path, change: dict, message: str):
    meta = {**load(built / "kernel-metadata.json"), **change}
    with pytest.raises(KsegError, match=message):
        check_kernel_metadata(meta, "uwmgi")


def test_absent_enable_internet_is_refused_for_a_code_competition(built: Path):
    meta = load(built / "kernel-metadata.json")
    del meta["enable_internet"]
    with pytest.raises(KsegError, match="enable_internet"):
        check_kernel_metadata(meta, "uwmgi")


def test_script_installs_offline_and_runs_kseg_submit(built: Path):
    meta = load(built / "kernel-metadata.json")
    script = (built / meta["code_file"]).read_text()
    tree = ast.parse(script)  # valid Python
    assert "--no-index" in script and "--find-links" in script
    assert "submission.csv" in script
    settings_node = next(
        node
        for node in tree.body
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "SETTINGS"
    )
    settings = ast.literal_eval(settings_node.value)
    assert settings["requirement"] == "kaggle-seg==0.1.0"
    wheels_id = load(built / "wheels" / "dataset-metadata.json")["id"]
    assert settings["wheels_source"] == wheels_id.split("/")[1]
    args = settings["submit_args"]
    assert args[args.index("--checkpoints") + 1] == "{weights}/tiny_unet"
    assert args[args.index("--tta") + 1] == "flip"


def test_wheels_dataset_holds_kaggle_seg_and_what_the_image_lacks(built: Path):
    wheels = sorted(p.name for p in (built / "wheels").glob("*.whl"))
    assert any(w.startswith("kaggle_seg-") for w in wheels)
    assert any(w.startswith("segmentation_models_pytorch-") for w in wheels)
    # The image has these: shipping them would be gigabytes.
    assert not [w for w in wheels if w.split("-")[0] in ("torch", "torchvision", "numpy", "timm")]
    (kaggle_seg_wheel,) = (built / "wheels").glob("kaggle_seg-*.whl")
    with zipfile.ZipFile(kaggle_seg_wheel) as archive:
        names = archive.namelist()
    assert "kaggle_seg/configs/uwmgi.yaml" in names  # package data
    assert "kaggle_seg/kernel.py" in names
    meta = load(built / "wheels" / "dataset-metadata.json")
    assert 6 <= len(meta["title"]) <= 50 and len(meta["licenses"]) == 1
    record = load(built / "kseg-kernel.json")
    assert {w["name"] for w in record["dependency_wheels"]} >= {"segmentation-models-pytorch"}


def test_weights_dataset_holds_best_checkpoints_configs_and_postprocess(built: Path):
    weights = built / "weights"
    files = sorted(str(p.relative_to(weights)) for p in weights.rglob("*") if p.is_file())
    assert files == [
        "dataset-metadata.json",
        "kseg-weights.json",
        "tiny_unet/fold_0/best.pt",
        "tiny_unet/fold_0/config.yaml",
        "tiny_unet/fold_1/best.pt",
        "tiny_unet/fold_1/config.yaml",
        "tiny_unet/postprocess.json",
    ]  # no last.pt (optimizer state), history or OOF
    meta = load(weights / "dataset-metadata.json")
    assert meta["licenses"] == [{"name": "CC0-1.0"}]
    manifest = load(weights / "kseg-weights.json")
    assert set(manifest["experiments"]["tiny_unet"]["folds"]) == {"fold_0", "fold_1"}


def test_no_credential_anywhere_in_the_build(built: Path):
    for place, data in all_bytes(built):
        assert SENTINEL_KEY.encode() not in data, place
        assert SENTINEL_JSON_KEY.encode() not in data, place
        assert Path(place.split("!")[-1]).name not in ("kaggle.json", "access_token"), place
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


def test_build_refuses_a_credential_and_writes_nothing(tmp_path: Path, monkeypatch):
    runs = tmp_path / "runs"
    fake_run(runs, "leaky", folds=(0,), postprocess=False)
    (runs / "leaky" / "fold_0" / "config.yaml").write_text(f"token: {SENTINEL_KEY}\n")
    monkeypatch.setenv("KAGGLE_KEY", SENTINEL_KEY)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(KsegError, match=r"credential.*leaky/fold_0/config.yaml"):
        build_kernel("uwmgi", ["leaky"], runs_root=runs, out_root=tmp_path / "kernels",
                     username=USER, repack=True)  # fmt: skip
    assert list((tmp_path / "kernels").iterdir()) == []  # no kernel, no staging folder


def test_build_needs_force_to_replace_and_names_missing_checkpoints(tmp_path: Path, built: Path):
    runs = tmp_path / "runs"
    fake_run(runs, "tiny_unet", folds=(0,))
    wheels = built / "wheels"
    options = dict(runs_root=runs, out_root=tmp_path / "kernels", username=USER, wheels_from=wheels)
    first = build_kernel("uwmgi", ["tiny_unet"], **options)
    assert [w.source for w in first.wheels] == ["wheelhouse"] * len(first.wheels)
    with pytest.raises(KsegError, match="--force"):
        build_kernel("uwmgi", ["tiny_unet"], **options)
    build_kernel("uwmgi", ["tiny_unet"], force=True, **options)
    with pytest.raises(KsegError, match=r"fold_3/best.pt"):
        build_kernel("uwmgi", ["tiny_unet"], folds=[3], force=True, **options)
    with pytest.raises(KsegError, match="no wheel of segmentation-models-pytorch"):
        build_kernel("uwmgi", ["tiny_unet"], force=True, **{**options, "wheels_from": tmp_path})


def test_wheel_plan_follows_the_kaggle_image_versions():
    image = read_kaggle_image(IMAGE_FILE)
    assert "segmentation-models-pytorch" not in image and "torch" in image
    requires = ["torch>=2.2", "segmentation-models-pytorch>=0.3.4", "scikit-learn>=1.4"]
    assert [n.name for n in plan_dependency_wheels(requires, image)] == [
        "segmentation-models-pytorch"
    ]
    # An image pinning an older scikit-learn than required: its wheel must be shipped.
    old_image = {**image, "scikit-learn": "1.2.2"}
    (need,) = [n for n in plan_dependency_wheels(requires, old_image) if n.name == "scikit-learn"]
    assert "scikit-learn==1.2.2" in need.reason
    with pytest.raises(KsegError, match="not-a-real-package"):
        plan_dependency_wheels(["not-a-real-package>=1"], image)


def test_repacked_wheel_has_a_record_of_every_file(tmp_path: Path):
    wheel = repack_installed("shellingham", tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        record_name = next(n for n in names if n.endswith(".dist-info/RECORD"))
        record = archive.read(record_name).decode().splitlines()
    assert {line.split(",")[0] for line in record} == names
    assert not [n for n in names if "__pycache__" in n or n.endswith("/INSTALLER")]


# ---- rehearse -----------------------------------------------------------------------------------


def test_venv_sees_only_the_kaggle_image_packages(tmp_path: Path):
    image = read_kaggle_image(IMAGE_FILE)
    exposed = expose_image_packages([*image, "pip"], tmp_path / "image")
    assert "numpy" in exposed and "pyyaml" in exposed
    assert "segmentation-models-pytorch" not in exposed and "kaggle-seg" not in exposed
    python = make_kaggle_venv(tmp_path / "venv", tmp_path / "image", guard=False)
    code = (
        "import importlib.util as u, yaml, pip; "
        "print([m for m in ('segmentation_models_pytorch', 'kaggle_seg', 'hypothesis', 'pytest')"
        " if u.find_spec(m)])"
    )
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                            cwd=tmp_path, env=clean_env(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_socket_guard_refuses_connections_out(tmp_path: Path):
    (tmp_path / "kseg_socket_guard.py").write_text(SOCKET_GUARD)
    code = (
        "import kseg_socket_guard, socket\n"
        "try:\n    socket.create_connection(('203.0.113.7', 80), timeout=2)\n"
        "except OSError as e:\n    print('refused', e)\n"
    )
    env = {**clean_env(tmp_path), "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "refused" in result.stdout and "offline" in result.stdout
    # Loopback stays usable (DataLoader workers, local services).
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    local = f"import kseg_socket_guard, socket; socket.create_connection({server.getsockname()})"
    assert subprocess.run([sys.executable, "-c", local], env=env).returncode == 0
    server.close()


def test_unshare_makes_inputs_read_only_and_cuts_the_network(tmp_path: Path):
    if resolve_isolation("auto") != "unshare":
        pytest.skip("no user + network + mount namespaces here; rehearse uses the socket guard")
    from kaggle_seg.kernel import _READ_ONLY_SH

    (tmp_path / "input").mkdir()
    code = (
        "import socket, sys\n"
        "try:\n    open(sys.argv[1] + '/x', 'w')\nexcept OSError as e:\n    print(e.strerror)\n"
        "try:\n    socket.create_connection(('203.0.113.7', 80), timeout=2)\n"
        "except OSError as e:\n    print(e.strerror)\n"
    )
    input_dir = str(tmp_path / "input")
    command = ["unshare", "-rnm", "sh", "-c", _READ_ONLY_SH, "sh", input_dir,
               sys.executable, "-c", code, input_dir]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.stdout.splitlines() == ["Read-only file system", "Network is unreachable"]


def test_diagnose_names_the_cause():
    pip = "ERROR: No matching distribution found for segmentation-models-pytorch>=0.3.4\n"
    assert "segmentation-models-pytorch>=0.3.4 in the wheels dataset" in diagnose(pip)
    module = "Traceback ...\nModuleNotFoundError: No module named 'typer'\n"
    assert "module typer" in diagnose(module)
    kseg_error = "UserWarning: <urlopen error Temporary failure in name resolution>\n" \
        "error: postprocess.json: invalid\nerror: kaggle_seg submit exited with 1\n"  # fmt: skip
    assert diagnose(kseg_error) == "error: postprocess.json: invalid"


def test_estimate_splits_start_up_from_time_per_item():
    from kaggle_seg.kernel import RehearsalRun

    def run(items: int, seconds: float) -> RehearsalRun:
        return RehearsalRun("r", items, True, seconds + 5, 5.0, seconds, 3 * items, items, None, "")

    estimate, basis = estimate_run_time([run(10, 12.0), run(30, 16.0)], 1000, "slices")
    assert estimate == pytest.approx(5 + 10 + 0.2 * 1000)
    assert "fitted" in basis
    estimate, basis = estimate_run_time([run(10, 12.0)], 1000, "slices")
    assert estimate == pytest.approx(5 + 1.2 * 1000)
    assert "upper bound" in basis


def test_rehearse_fails_clearly_when_a_wheel_is_missing(built: Path, phantom_dir: Path, tmp_path):
    kernel = shutil.copytree(built, tmp_path / built.name)
    for wheel in (kernel / "wheels").glob("segmentation_models_pytorch-*.whl"):
        wheel.unlink()
    result = kseg("kernel", "rehearse", str(kernel), "--data-dir", str(phantom_dir),
                  "--holdout", "1", env=clean_env(tmp_path / "home"))  # fmt: skip
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: rehearsal failed: empty test (public re-run): pip found no ")
    assert "segmentation-models-pytorch" in error
    report = load(kernel / "rehearsal" / "report.json")
    assert len(report["runs"]) == 1  # stopped at the first failure


@pytest.fixture(scope="module")
def trained(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch seed U-Net (4 channels, depth 2, 64x64) on the phantom: runs/<exp>/fold_0."""
    from kaggle_seg.config import load_experiment
    from kaggle_seg.prepare import folds_for_table, prepare_table
    from kaggle_seg.train import train_fold

    root = tmp_path_factory.mktemp("trained")
    prepare_table("uwmgi", phantom_dir, root / "table.csv")
    folds_for_table("uwmgi", root / "table.csv", root / "folds.csv", 2, 0, force=False)
    config = root / "tiny.yaml"
    config.write_text(f"""
name: tiny
data: {{competition: uwmgi, table: {root / "table.csv"}, folds: {root / "folds.csv"}}}
augment: {{preset: none, height: 64, width: 64}}
model: {{architecture: unet, params: {{base_channels: 4, depth: 2}}}}
train: {{epochs: 1, batch_size: 16, num_workers: 0, cache: none}}
""")
    train_fold(load_experiment(config), 0, run_root=root / "runs", device="cpu")
    return root / "runs"


@pytest.mark.slow
def test_rehearse_end_to_end(trained: Path, phantom_dir: Path, tmp_path: Path):
    """Build from a real checkpoint and rehearse: the public re-run (empty test) and a held-back
    case both write a valid submission.csv, scored, timed and extrapolated to the hidden test."""
    if submit_parameters() is None:
        pytest.skip("kseg submit has not landed in this checkout")
    env = clean_env(tmp_path / "home", KAGGLE_USERNAME=USER, KAGGLE_KEY=SENTINEL_KEY)
    out = str(tmp_path / "kernels")
    result = kseg("kernel", "build", "-c", "uwmgi", "-e", "tiny", "--runs-dir", str(trained),
                  "--out-dir", out, "--repack-installed", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    kernel = tmp_path / "kernels" / "kseg-uwmgi-tiny"
    result = kseg("kernel", "rehearse", str(kernel), "--data-dir", str(phantom_dir),
                  "--holdout", "1", env=env)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].startswith("ok    empty test (public re-run): 0 test slices (")
    assert lines[2].startswith("ok    held-back test (1 train cases): 12 test slices")
    assert "score" in lines[2]
    assert "of the 9 h limit" in lines[3]
    report = load(kernel / "rehearsal" / "report.json")
    assert [r["ok"] for r in report["runs"]] == [True, True]
    assert report["estimate_seconds"] > 0
    assert (kernel / "rehearsal" / "run2_submission.csv").is_file()
    assert find_credentials(kernel, [SENTINEL_KEY]) == []


# ---- push (fake Kaggle API) ---------------------------------------------------------------------


def test_push_datasets_then_kernel(built: Path, fake_kaggle: FakeKaggle, tmp_path: Path):
    from typer.testing import CliRunner

    from kaggle_seg.cli import app

    kernel = shutil.copytree(built, tmp_path / built.name)
    runner = CliRunner()
    for part in ("wheels", "weights"):
        result = runner.invoke(app, ["dataset", "push", str(kernel / part), "--message", "v1"])
        assert result.exit_code == 0, result.output
    created = {call["slug"]: call for call in fake_kaggle.calls("CreateDataset")}
    assert set(created) == {"kseg-uwmgi-tiny-unet-wheels", "kseg-uwmgi-tiny-unet-weights"}
    uploaded = set(fake_kaggle.uploaded())
    assert "tiny_unet.zip" in uploaded  # the experiment folder, zipped (Kaggle unpacks it)
    assert any(name.startswith("kaggle_seg-") for name in uploaded)

    result = runner.invoke(app, ["kernel", "push", str(kernel)])
    assert result.exit_code == 0, result.output
    (saved,) = fake_kaggle.calls("SaveKernel")
    assert saved["enableInternet"] is False
    assert saved["slug"] == f"{USER}/kseg-uwmgi-tiny-unet"
    assert saved["datasetDataSources"] == load(kernel / "kernel-metadata.json")["dataset_sources"]
    assert "--no-index" in saved["text"]


def test_push_refuses_a_folder_with_credentials(built: Path, fake_kaggle: FakeKaggle, tmp_path):
    from typer.testing import CliRunner

    from kaggle_seg.cli import app

    wheels = shutil.copytree(built / "wheels", tmp_path / "wheels")
    (wheels / "kaggle.json").write_text("{}")
    result = CliRunner().invoke(app, ["dataset", "push", str(wheels)])
    assert result.exit_code != 0
    assert "credentials" in str(result.exception)
    assert fake_kaggle.requests == []
