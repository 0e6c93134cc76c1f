"""kseg kernel rehearse: the Kaggle image's packages at Kaggle's versions (image.py), no network
and read-only inputs (sandbox.py), the causes of failures, the time estimate, and whole runs of
a real kernel on the phantom (rehearse.py)."""

from __future__ import annotations

import base64
import hashlib
import shutil
import socket
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from kernel_helpers import IMAGE_FILE, SENTINEL_KEY, USER, clean_env, kseg, load
from packaging.requirements import Requirement

from kaggle_seg.kernel import RehearsalRun, diagnose, estimate_run_time, find_credentials
from kaggle_seg.kernel.image import prepare_image_env, version_table
from kaggle_seg.kernel.sandbox import (
    READ_ONLY_SH,
    SOCKET_GUARD,
    expose_image_packages,
    make_kaggle_venv,
    resolve_isolation,
)
from kaggle_seg.kernel.wheels import read_kaggle_image

pytest_plugins = ["kernel_fixtures"]


def venv_env(home: Path) -> dict[str, str]:
    """What a rehearsal venv runs with: no PYTHONPATH leaking this checkout in."""
    env = clean_env(home)
    env.pop("PYTHONPATH", None)
    return env


def make_wheel(folder: Path, name: str, version: str, requires: str = "") -> Path:
    """A minimal pure wheel of module `name` (underscored) whose VERSION is `version`."""
    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    requirement = f"Requires-Dist: {requires}\n" if requires else ""
    files = {
        f"{module}/__init__.py": f"VERSION = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        + requirement,
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: kseg-test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(data)}")
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


@pytest.mark.slow
def test_kaggle_versions_are_installed_from_the_registry(tmp_path: Path):
    """Pins the registry has are installed at Kaggle's version; one it lacks is taken from this
    machine and said so; the result is cached for the next rehearsal."""
    registry = tmp_path / "registry"
    make_wheel(registry, "kseg-pin-a", "1.0", requires="kseg-pin-b")
    make_wheel(registry, "kseg-pin-a", "2.0")  # newer: the pin must win
    make_wheel(registry, "kseg-pin-b", "1.0")  # not pinned: not installed, but said
    image = {"kseg-pin-a": "1.0", "six": "0.0.1", "shellingham": None}
    options = dict(
        cache_dir=tmp_path / "cache", pip_args=["--no-index", "--find-links", str(registry)]
    )
    said: list[str] = []
    env = prepare_image_env(image, tmp_path / "work", say=said.append, **options)
    assert env.built and "installing Kaggle's image versions" in said[0]
    rows = {row.name: row for row in env.rows}
    assert (rows["kseg-pin-a"].rehearsal, rows["kseg-pin-a"].source) == ("1.0", "registry")
    six = metadata.version("six")
    assert (rows["six"].rehearsal, rows["six"].local) == (six, six)
    assert rows["six"].source == "this machine: the registry has no such version"
    assert rows["shellingham"].source == "this machine: not pinned"
    assert env.notes == ["kseg-pin-a 1.0 requires kseg-pin-b, which is not installed."]

    python = make_kaggle_venv(tmp_path / "venv", env.sites, guard=False)
    code = "import kseg_pin_a, six, shellingham; print(kseg_pin_a.VERSION, six.__version__)"
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                            cwd=tmp_path, env=venv_env(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1.0", six]

    table = version_table(env)
    assert table[0].split() == ["package", "Kaggle", "image", "rehearsal", "this", "machine",
                                "rehearsal's", "from"]  # fmt: skip
    # kseg-pin-a is at Kaggle's version in the rehearsal (this machine lacks it: only counted)
    assert [line.split()[0] for line in table[1:-1]] == ["six"]
    assert table[-1].startswith("1 of 2 pins at Kaggle's version in the rehearsal (kaggle); ")

    again = prepare_image_env(image, tmp_path / "work2", say=said.append, **options)
    assert not again.built and again.location == env.location and len(said) == 1
    assert again.rows == env.rows and again.notes == env.notes


def test_a_borrowed_package_brings_the_versions_it_needs():
    """torch is this machine's; a pin it does not accept (Kaggle's setuptools for a newer
    torch) is borrowed too, or pip in the kernel would refuse the mix."""
    from kaggle_seg.kernel.image import _with_their_needs

    rich = metadata.version("rich")
    image = {"rich": "13.0.0", "pygments": "1.0", "markdown-it-py": "2.2.0", "six": "1.17.0"}
    borrowed = _with_their_needs(image, {"rich": "this machine: test"})
    assert borrowed["pygments"] == f"this machine: rich {rich} needs " + next(
        str(r.specifier)
        for r in map(Requirement, metadata.requires("rich"))
        if r.name == "pygments"
    )
    assert "six" not in borrowed  # rich does not need it


def test_a_pin_that_cannot_be_installed_is_one_line(tmp_path: Path):
    registry = tmp_path / "registry"
    make_wheel(registry, "kseg-pin-a", "1.0")
    from kaggle_seg.errors import KsegError

    pip_args = ["--no-index", "--find-links", str(registry), "--no-such-option"]
    with pytest.raises(KsegError) as error:
        prepare_image_env({"kseg-pin-a": "1.0"}, tmp_path, cache_dir=tmp_path / "cache",
                          pip_args=pip_args, say=lambda line: None)  # fmt: skip
    assert str(error.value).startswith("installing Kaggle's image versions failed: ")
    assert "\n" not in str(error.value)


def test_local_versions_say_how_far_they_are_from_kaggles(tmp_path: Path):
    image = read_kaggle_image(IMAGE_FILE)
    env = prepare_image_env(image, tmp_path, mode="local")
    assert env.mode == "local" and all(r.rehearsal == r.local for r in env.rows)
    pinned = [r for r in env.rows if r.kaggle]
    same = sum(r.local == r.kaggle for r in pinned)
    table = version_table(env)
    assert len(table) == len(pinned) - same + 2  # header, one row per difference, summary
    assert table[-1].startswith(f"{same} of {len(pinned)} pins at Kaggle's version")


@pytest.mark.slow
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
                            cwd=tmp_path, env=venv_env(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.slow
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


@pytest.mark.slow
def test_unshare_makes_inputs_read_only_and_cuts_the_network(tmp_path: Path):
    if resolve_isolation("auto") != "unshare":
        pytest.skip("no user + network + mount namespaces here; rehearse uses the socket guard")
    (tmp_path / "input").mkdir()
    code = (
        "import socket, sys\n"
        "try:\n    open(sys.argv[1] + '/x', 'w')\nexcept OSError as e:\n    print(e.strerror)\n"
        "try:\n    socket.create_connection(('203.0.113.7', 80), timeout=2)\n"
        "except OSError as e:\n    print(e.strerror)\n"
    )
    input_dir = str(tmp_path / "input")
    command = ["unshare", "-rnm", "sh", "-c", READ_ONLY_SH, "sh", input_dir,
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


def test_estimate_is_an_upper_bound_with_the_fitted_line_beside_it():
    def run(items: int, seconds: float) -> RehearsalRun:
        return RehearsalRun("r", items, True, seconds + 5, 5.0, seconds, 3 * items, items, None, "")

    estimate, basis = estimate_run_time([run(10, 12.0), run(30, 16.0)], 1000, "slices")
    assert estimate == pytest.approx(5 + 16.0 / 30 * 1000)  # the larger run's pace: a bound
    assert "upper bound" in basis
    fitted = (5 + 10 + 0.2 * 1000) / 3600
    assert f"a line fitted to both runs says {fitted:.2f} h (start-up 10 s + 200 ms" in basis
    estimate, basis = estimate_run_time([run(10, 12.0)], 1000, "slices")
    assert estimate == pytest.approx(5 + 1.2 * 1000)
    assert "upper bound" in basis


@pytest.mark.slow
def test_rehearse_fails_clearly_when_a_wheel_is_missing(built: Path, phantom_dir: Path, tmp_path):
    kernel = shutil.copytree(built, tmp_path / built.name)
    for wheel in (kernel / "wheels").glob("segmentation_models_pytorch-*.whl"):
        wheel.unlink()
    result = kseg("kernel", "rehearse", str(kernel), "--data-dir", str(phantom_dir),
                  "--holdout", "1", "--image-versions", "local",
                  env=clean_env(tmp_path / "home"))  # fmt: skip
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: rehearsal failed: empty test (public re-run): pip found no ")
    assert "segmentation-models-pytorch" in error
    # The table of version differences came first, and the plain warning about local versions.
    assert "package" in result.stdout.splitlines()[0]
    assert "warning: --image-versions local" in result.stdout
    report = load(kernel / "rehearsal" / "report.json")
    assert len(report["runs"]) == 1  # stopped at the first failure
    assert report["image_versions"] == "local" and report["image_rows"]


@pytest.mark.slow
@pytest.mark.parametrize("weights_as", ["dataset", "model"])
@pytest.mark.slow
def test_rehearse_end_to_end(trained: Path, phantom_dir: Path, tmp_path: Path, weights_as: str):
    """Build from a real checkpoint and rehearse: the public re-run (empty test) and a held-back
    case both write a valid submission.csv, scored, timed and extrapolated to the hidden test;
    the weights are found where Kaggle mounts a dataset, or a Model instance."""
    env = clean_env(tmp_path / "home", KAGGLE_USERNAME=USER, KAGGLE_KEY=SENTINEL_KEY)
    if weights_as == "model":  # and kseg submit as two torchrun processes, as on a T4 x2
        env["KSEG_PROCESSES"] = "2"
    out = str(tmp_path / "kernels")
    result = kseg("kernel", "build", "-c", "uwmgi", "-e", "tiny", "--runs-dir", str(trained),
                  "--out-dir", out, "--repack-installed", "--weights-as", weights_as,
                  env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    kernel = tmp_path / "kernels" / "kseg-uwmgi-tiny"
    result = kseg("kernel", "rehearse", str(kernel), "--data-dir", str(phantom_dir),
                  "--holdout", "1", "--image-versions", "local", env=env)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("isolation: "))
    assert lines[start + 1].startswith("ok    empty test (public re-run): 0 test slices (")
    held_back = "ok    held-back test (1 train cases, seen in training): 12 test slices"
    assert lines[start + 2].startswith(held_back)
    assert "score" in lines[start + 2]
    assert "of the 9 h limit" in lines[start + 3]
    report = load(kernel / "rehearsal" / "report.json")
    assert [r["ok"] for r in report["runs"]] == [True, True]
    assert report["estimate_seconds"] > 0
    assert (kernel / "rehearsal" / "run2_submission.csv").is_file()
    assert find_credentials(kernel, [SENTINEL_KEY]) == []
    processes = "2" if weights_as == "model" else "1"
    for log in sorted((kernel / "rehearsal").glob("run*.log")):
        assert f"KSEG_PROCESSES {processes}\n" in log.read_text(), log


def test_an_unreachable_registry_says_to_rehearse_offline(tmp_path: Path):
    from kaggle_seg.errors import KsegError

    unreachable = ["--index-url", "http://127.0.0.1:9/simple", "--retries", "1", "--timeout", "1"]
    with pytest.raises(KsegError) as error:
        prepare_image_env({"kseg-pin-a": "1.0", "kseg-pin-b": "1.0"}, tmp_path,
                          cache_dir=tmp_path / "cache", pip_args=unreachable,
                          say=lambda line: None)  # fmt: skip
    message = str(error.value)
    assert "registry cannot be reached" in message and "--image-versions local" in message
    assert "\n" not in message


def test_a_kernel_whose_script_was_renamed_is_refused_before_anything_runs(
    built: Path, tmp_path: Path
):
    from kaggle_seg.errors import KsegError
    from kaggle_seg.kernel import rehearse_kernel

    kernel = shutil.copytree(built, tmp_path / built.name)
    script = kernel / load(kernel / "kernel-metadata.json")["code_file"]
    script.rename(kernel / "renamed.py")
    with pytest.raises(KsegError, match=rf"metadata.json: code_file {script.name} is not in"):
        rehearse_kernel(kernel, data_dir=tmp_path / "nowhere")
    assert not (kernel / "rehearsal").exists()


def test_a_holdout_larger_than_the_data_is_refused_before_any_run(
    built: Path, phantom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """--holdout is checked against the data when the inputs are staged, before the image's
    packages are installed or the first (empty-test) run starts."""
    from kaggle_seg.errors import KsegError
    from kaggle_seg.kernel import rehearse

    def no_install(*args, **kwargs):
        raise AssertionError("the image environment was prepared before --holdout was checked")

    monkeypatch.setattr(rehearse, "prepare_image_env", no_install)
    kernel = shutil.copytree(built, tmp_path / built.name)
    with pytest.raises(KsegError, match=r": 5 case\(s\); --holdout 9 is too many \(1 to 4\)$"):
        rehearse.rehearse_kernel(kernel, data_dir=phantom_dir, holdout=9, work_root=tmp_path)
    assert not list(tmp_path.glob("kseg-rehearse-*"))  # the staged inputs were cleaned up


def test_the_kernel_runs_one_submit_process_per_gpu(monkeypatch: pytest.MonkeyPatch):
    import importlib.util

    template = Path(__file__).parents[1] / "kernels" / "templates" / "kernel.py"
    spec = importlib.util.spec_from_file_location("kernel_template", template)
    kernel = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernel)
    monkeypatch.delenv("KSEG_PROCESSES", raising=False)
    assert kernel.submit_processes() == 1  # no GPU here: torch counts 0, one process
    monkeypatch.setenv("KSEG_PROCESSES", "2")
    assert kernel.submit_processes() == 2
    one = kernel.submit_command(["--data-dir", "d"], 1)
    assert one[1:] == ["-m", "kaggle_seg", "submit", "--data-dir", "d"]
    two = kernel.submit_command(["--data-dir", "d"], 2)
    assert two[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert two[5:] == ["-m", "kaggle_seg", "submit", "--data-dir", "d"]
