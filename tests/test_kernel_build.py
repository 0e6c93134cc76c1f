"""kseg kernel build: metadata Kaggle accepts (accelerator, sources, image pin), the script and
its `kseg submit` arguments, the wheels and weights it ships, names that stay inside their
root, and the rebuild rules (kaggle_seg/kernel/build.py, metadata.py, weights.py, wheels.py)."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from kernel_helpers import (
    IMAGE_FILE,
    USER,
    clean_env,
    fake_run,
    kseg,
    load,
    user_home,
)

from kaggle_seg.errors import KsegError
from kaggle_seg.kernel import (
    SubmitOptions,
    build_kernel,
    check_kernel_metadata,
    check_title,
    get_accelerator,
    slugify,
)
from kaggle_seg.kernel.build import update_build_record
from kaggle_seg.kernel.metadata import submit_arguments
from kaggle_seg.kernel.wheels import plan_dependency_wheels, read_kaggle_image, repack_installed

pytest_plugins = ["kernel_fixtures"]


def script_settings(kernel_dir: Path) -> dict:
    """The SETTINGS literal of a built kernel's script (which must be valid Python)."""
    meta = load(kernel_dir / "kernel-metadata.json")
    tree = ast.parse((kernel_dir / meta["code_file"]).read_text())
    node = next(
        node
        for node in tree.body
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "SETTINGS"
    )
    return ast.literal_eval(node.value)


def test_kernel_metadata_is_what_kaggle_needs(built: Path):
    meta = load(built / "kernel-metadata.json")
    assert meta["id"] == f"{USER}/kseg-uwmgi-tiny-unet"  # user from kaggle.json
    assert len(meta["title"]) >= 5
    assert meta["id"].split("/")[1] == slugify(meta["title"])
    # The client defaults the internet to on when the key is absent; it must be the string.
    assert meta["enable_internet"] == "false"
    assert meta["language"] == "python"
    assert meta["kernel_type"] == "script"
    # T4 x2 by default: with enable_gpu alone Kaggle has handed out P100s.
    assert (meta["enable_gpu"], meta["machine_shape"]) == ("true", "NvidiaTeslaT4")
    assert meta["competition_sources"] == ["uw-madison-gi-tract-image-segmentation"]
    wheels_id = load(built / "wheels" / "dataset-metadata.json")["id"]
    weights_id = load(built / "weights" / "dataset-metadata.json")["id"]
    assert meta["dataset_sources"] == [wheels_id, weights_id]
    assert meta["model_sources"] == []
    assert "docker_image" not in meta and "docker_image_pinning_type" not in meta
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
        ({"model_sources": ["user/model/pyTorch/default"]}, "model source"),
        ({"machine_shape": "NvidiaTeslaP100"}, "P100"),
        ({"machine_shape": None}, "machine_shape"),  # enable_gpu alone: a P100 may come
        ({"docker_image_pinning_type": "newest"}, "docker_image_pinning_type"),
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


@pytest.mark.slow
def test_p100_is_refused_with_one_line_saying_why(tmp_path: Path):
    fake_run(tmp_path / "runs", "tiny_unet", folds=(0,))
    result = kseg("kernel", "build", "-c", "uwmgi", "-e", "tiny_unet", "--accelerator", "p100",
                  "--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "kernels"),
                  env=clean_env(user_home(tmp_path)))  # fmt: skip
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --accelerator p100:")
    assert "CUDA" in line and "t4x2" in line
    assert not (tmp_path / "kernels").exists()  # refused before anything was written
    with pytest.raises(KeyError, match="t4x2"):
        get_accelerator("a100")


@pytest.mark.parametrize(
    ("accelerator", "gpu", "tpu", "shape"),
    [
        ("l4", "true", "false", "NvidiaL4"),
        ("cpu", "false", "false", None),
        ("tpu", "false", "true", "TpuV5E8"),
    ],
)
def test_accelerator_choice_is_written(
    built: Path, tmp_path: Path, accelerator: str, gpu: str, tpu: str, shape: str | None
):
    fake_run(tmp_path / "runs", "tiny_unet", folds=(0,))
    image = "gcr.io/kaggle-images/python@sha256:ab"
    build = build_kernel("uwmgi", ["tiny_unet"], runs_root=tmp_path / "runs",
                         out_root=tmp_path / "kernels", username=USER, accelerator=accelerator,
                         wheels_from=built / "wheels", docker_image=image,
                         image_pinning="original")  # fmt: skip
    meta = load(build.kernel_dir / "kernel-metadata.json")
    assert (meta["enable_gpu"], meta["enable_tpu"], meta.get("machine_shape")) == (gpu, tpu, shape)
    assert meta["docker_image"] == image
    assert meta["docker_image_pinning_type"] == "original"
    assert load(build.kernel_dir / "kseg-kernel.json")["accelerator"] == accelerator
    assert bool(build.warnings) == (accelerator == "tpu")  # kseg predicts on the TPU host's CPU


def test_weights_as_a_kaggle_model(built: Path, tmp_path: Path):
    fake_run(tmp_path / "runs", "tiny_unet", folds=(0,))
    build = build_kernel("uwmgi", ["tiny_unet"], runs_root=tmp_path / "runs",
                         out_root=tmp_path / "kernels", username=USER, weights_as="model",
                         model="uwmgi-unet", wheels_from=built / "wheels")  # fmt: skip
    assert build.weights_source == f"{USER}/uwmgi-unet/pyTorch/default"
    meta = load(build.kernel_dir / "kernel-metadata.json")
    assert meta["dataset_sources"] == [build.wheels_dataset]  # no weights dataset
    assert meta["model_sources"] == []  # filled in by kseg model push, with the version
    assert not (build.kernel_dir / "weights" / "dataset-metadata.json").exists()
    assert (build.kernel_dir / "weights" / "tiny_unet" / "fold_0" / "best.pt").is_file()
    settings = script_settings(build.kernel_dir)
    assert settings["weights_model"] == build.weights_source
    assert settings["weights_source"] is None
    record = load(build.kernel_dir / "kseg-kernel.json")
    assert record["weights"]["model"] == build.weights_source
    with pytest.raises(KsegError, match="--weights-as model"):
        build_kernel("uwmgi", ["tiny_unet"], runs_root=tmp_path / "runs", model="uwmgi-unet",
                     out_root=tmp_path / "kernels", username=USER, force=True)  # fmt: skip
    for bad in ("a/b/c", "Bad_Slug", "x"):
        with pytest.raises(KsegError, match="--model"):
            build_kernel("uwmgi", ["tiny_unet"], runs_root=tmp_path / "runs",
                         out_root=tmp_path / "kernels", username=USER, weights_as="model",
                         model=bad, wheels_from=built / "wheels", force=True)  # fmt: skip


def test_script_installs_offline_and_runs_kseg_submit(built: Path):
    meta = load(built / "kernel-metadata.json")
    script = (built / meta["code_file"]).read_text()
    assert "--no-index" in script and "--find-links" in script
    assert "submission.csv" in script
    settings = script_settings(built)
    assert settings["requirement"] == "kaggle-seg==0.1.0"
    wheels_id = load(built / "wheels" / "dataset-metadata.json")["id"]
    assert settings["wheels_source"] == wheels_id.split("/")[1]
    args = settings["submit_args"]
    assert args[args.index("--checkpoints") + 1] == "{weights}/tiny_unet"
    assert args[args.index("--tta") + 1] == "flip"


def test_submit_arguments_come_from_the_options_object():
    options = SubmitOptions(tta="d4", batch_size=4, ensemble_weights="1,0.5")
    assert submit_arguments(["a", "b"], options) == [
        "--data-dir", "{data}", "--out", "{working}/submission.csv",
        "--checkpoints", "{weights}/a", "--checkpoints", "{weights}/b",
        "--weights", "1,0.5", "--tta", "d4", "--batch-size", "4",
    ]  # fmt: skip
    # Every option the kernel passes is one `kseg submit` takes.
    from typer.testing import CliRunner

    from kaggle_seg.cli import app

    help_text = CliRunner().invoke(app, ["submit", "--help"], env={"COLUMNS": "200"}).output
    for flag in submit_arguments(["a"], options):
        if flag.startswith("--"):
            assert flag in help_text, flag


@pytest.mark.slow
def test_the_kernel_package_does_not_import_the_cli():
    """The old kernel.py read `kseg submit`'s signature from cli.app: cli -> kernel -> cli."""
    code = (
        "import sys, kaggle_seg.kernel, kaggle_seg.kernel.publish; "
        "assert 'kaggle_seg.cli' not in sys.modules, 'kernel imports the CLI'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


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
    assert "kaggle_seg/kernel/build.py" in names
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


@pytest.mark.parametrize("experiment", ["../../outside", "/abs/exp", "a/b", "..", ".hidden"])
@pytest.mark.slow
def test_experiment_names_cannot_leave_the_runs_folder(tmp_path: Path, experiment: str):
    """`-e ../../x` used to copy checkpoints outside the kernel folder; `-e /abs` crashed."""
    runs = tmp_path / "deep" / "er" / "runs"
    fake_run(tmp_path, "outside", folds=(0,))  # what ../../outside would reach
    fake_run(runs, "tiny_unet", folds=(0,))
    env = clean_env(user_home(tmp_path / "user"))
    before = sorted(tmp_path.rglob("*"))
    result = kseg("kernel", "build", "-c", "uwmgi", "-e", experiment, "--runs-dir", str(runs),
                  "--out-dir", str(tmp_path / "deep" / "kernels"), env=env)  # fmt: skip
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --experiment ") and "plain folder name" in line
    assert sorted(tmp_path.rglob("*")) == before  # nothing written anywhere


def test_kernel_names_cannot_leave_the_kernels_folder(tmp_path: Path, built: Path):
    fake_run(tmp_path / "runs", "tiny_unet", folds=(0,))
    for name in ("../x", "/tmp/x", "templates"):
        with pytest.raises(KsegError, match="--name"):
            build_kernel("uwmgi", ["tiny_unet"], runs_root=tmp_path / "runs", name=name,
                         out_root=tmp_path / "kernels", username=USER,
                         wheels_from=built / "wheels")  # fmt: skip
    with pytest.raises(KsegError, match="fold numbers"):
        from kaggle_seg.kernel import parse_folds

        parse_folds("0,-1")


@pytest.mark.slow
def test_build_needs_force_to_replace_and_names_missing_checkpoints(tmp_path: Path, built: Path):
    runs = tmp_path / "runs"
    fake_run(runs, "tiny_unet", folds=(0,))
    wheels = built / "wheels"
    options = dict(runs_root=runs, out_root=tmp_path / "kernels", username=USER, wheels_from=wheels)
    first = build_kernel("uwmgi", ["tiny_unet"], **options)
    assert [w.source for w in first.wheels] == ["wheelhouse"] * len(first.wheels)
    with pytest.raises(KsegError, match="--force"):
        build_kernel("uwmgi", ["tiny_unet"], **options)
    # What was pushed and submitted from the first build stays on record after a rebuild.
    kernel_dir = first.kernel_dir
    pushed = {"version": 3, "url": "https://www.kaggle.com/code/x", "time": "t"}
    update_build_record(kernel_dir, pushed=pushed, submissions=[{"version": 3}])
    build_kernel("uwmgi", ["tiny_unet"], force=True, **options)
    record = load(kernel_dir / "kseg-kernel.json")
    assert "pushed" not in record and "submissions" not in record  # the new build is unpushed
    (earlier,) = record["earlier_builds"]
    assert earlier["pushed"] == pushed and earlier["submissions"] == [{"version": 3}]
    assert earlier["experiments"] == ["tiny_unet"] and earlier["built"]
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


def test_preprocessing_that_needs_simpleitk_ships_it(tmp_path: Path) -> None:
    from kaggle_seg.config import ExperimentConfig, save_config
    from kaggle_seg.kernel.build import preprocessing_needs

    folds = []
    for k, steps in enumerate((["n4", "zscore"], ["clahe"])):
        fold = tmp_path / "exp" / f"fold_{k}"
        fold.mkdir(parents=True)
        save_config(
            ExperimentConfig.model_validate({"data": {"competition": "lgg", "preprocess": steps}}),
            fold / "config.yaml",
        )
        folds.append(fold)
    assert preprocessing_needs({"exp": folds}) == (["n4"], ["SimpleITK>=2.0"])
    assert preprocessing_needs({"exp": folds[1:]}) == ([], [])


def test_an_ensemble_ships_its_own_tuned_settings(tmp_path: Path, built: Path):
    from kaggle_seg.postprocess import default_postprocess, load_postprocess, save_postprocess

    runs = tmp_path / "runs"
    fake_run(runs, "a", folds=(0,))
    fake_run(runs, "b", folds=(0,))
    options = dict(
        runs_root=runs, out_root=tmp_path / "kernels", username=USER, wheels_from=built / "wheels"
    )
    plain = build_kernel("uwmgi", ["a", "b"], name="plain", **options)
    assert "--postprocess" not in script_settings(plain.kernel_dir)["submit_args"]
    assert any("without --postprocess" in w for w in plain.warnings)

    settings = default_postprocess(["large_bowel", "small_bowel", "stomach"])
    settings = settings.model_copy(update={"thresholds": [0.3, 0.4, 0.45]})
    save_postprocess(settings, tmp_path / "blend" / "postprocess.json")
    build = build_kernel(
        "uwmgi", ["a", "b"], name="tuned", postprocess=tmp_path / "blend" / "postprocess.json",
        **options,
    )  # fmt: skip
    args = script_settings(build.kernel_dir)["submit_args"]
    assert args[args.index("--postprocess") + 1] == "{weights}/postprocess.json"
    shipped = build.kernel_dir / "weights" / "postprocess.json"
    assert load_postprocess(shipped) == settings
    assert load(build.kernel_dir / "weights" / "kseg-weights.json")["postprocess"] == (
        "postprocess.json"
    )
    assert not any("without --postprocess" in w for w in build.warnings)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(KsegError, match=r"broken\.json"):
        build_kernel("uwmgi", ["a", "b"], name="broken", postprocess=tmp_path / "broken.json",
                     **options)  # fmt: skip
    assert not (tmp_path / "kernels" / "broken").exists()


def test_build_refuses_what_the_kernels_submit_would_refuse_on_kaggle(tmp_path: Path, built: Path):
    """A build that passes must not fail on Kaggle for what could be seen here: checkpoints of
    another competition, a damaged best.pt, an unknown TTA, an experiment given twice."""
    from kaggle_seg.kernel.build import TTA_NAMES
    from kaggle_seg.tta import TTA_MODES

    assert tuple(TTA_MODES) == TTA_NAMES
    runs = tmp_path / "runs"
    fake_run(runs, "nuclei", folds=(0,), competition="dsb2018")
    fake_run(runs, "gi", folds=(0, 2))
    options = dict(
        runs_root=runs, out_root=tmp_path / "kernels", username=USER, wheels_from=built / "wheels"
    )
    with pytest.raises(KsegError, match=r"fold_0/best.pt: trained for dsb2018, not -c uwmgi"):
        build_kernel("uwmgi", ["nuclei"], **options)
    with pytest.raises(KsegError, match=r"--tta 'bogus': choose one of none, hflip, flip, d4"):
        build_kernel("uwmgi", ["gi"], submit=SubmitOptions(tta="bogus"), **options)
    with pytest.raises(KsegError, match=r"--experiment gi given twice"):
        build_kernel("uwmgi", ["gi", "gi"], **options)
    with pytest.raises(KsegError, match=r"fold_1/best.pt: checkpoint not found \(trained folds: "
                       r"fold_0, fold_2\)"):  # fmt: skip
        build_kernel("uwmgi", ["gi"], folds=[1], **options)
    best = runs / "gi" / "fold_2" / "best.pt"
    best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    with pytest.raises(KsegError, match=r"fold_2/best.pt: .*truncated or damaged"):
        build_kernel("uwmgi", ["gi"], **options)
    assert not (tmp_path / "kernels").exists() or list((tmp_path / "kernels").iterdir()) == []


def test_an_untuned_experiment_builds_with_a_warning(tmp_path: Path, built: Path):
    runs = tmp_path / "runs"
    fake_run(runs, "untuned", folds=(0,), postprocess=False)
    build = build_kernel(
        "uwmgi", ["untuned"], runs_root=runs, out_root=tmp_path / "kernels", username=USER,
        wheels_from=built / "wheels",
    )  # fmt: skip
    assert any("untuned has no postprocess.json" in w and "kseg tune" in w for w in build.warnings)
    fold = runs / "started" / "fold_0"
    fold.mkdir(parents=True)
    (fold / "last.pt").write_bytes(b"")
    with pytest.raises(KsegError, match=r"no fold_<k>/best.pt checkpoints \(fold_0 not finished"):
        build_kernel("uwmgi", ["started"], runs_root=runs, out_root=tmp_path / "k2",
                     username=USER, wheels_from=built / "wheels")  # fmt: skip


def test_a_kernel_named_wrongly_is_one_line_for_the_argument_or_the_option():
    """`kseg kernel status foo` (an argument) and `kseg submit --kernel foo` (an option) share
    the message, so it names neither spelling."""
    from kaggle_seg.kernel.publish import resolve_kernel

    with pytest.raises(KsegError, match=r"^kernel 'foo': expected a built kernel folder or "):
        resolve_kernel("foo")
    with pytest.raises(KsegError, match=r"^kernel 'me/k/3' names version 3, --version 4$"):
        resolve_kernel("me/k/3", 4)
    assert resolve_kernel("me/k/3").version == 3
