"""atheris (coverage-guided) fuzzing of the RLE parser and the CSV readers / validators.

Run by hand, not by pytest (tests/test_fuzz.py holds the hypothesis properties CI runs):

    pip install atheris          # Linux / macOS wheels; not a kseg dependency
    nice -n 10 python benchmarks/fuzz_inputs.py rle -max_total_time=300
    nice -n 10 python benchmarks/fuzz_inputs.py csv -max_total_time=300

Everything after the target name goes to libFuzzer (-runs=N, -max_total_time=S, a corpus
folder...). A finding is any exception other than a one-line KsegError, or an RLE that decodes
differently from the format's definition (tests/test_fuzz.py `reference_pixels`); atheris then
stops and prints the input. libFuzzer's last line, "Done N runs in S second(s)", gives the
number of inputs and the time.
"""

from __future__ import annotations

import sys
import tempfile
import types
from pathlib import Path

import atheris
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_fuzz import reference_pixels  # noqa: E402

from kaggle_seg.competitions.uwmgi import read_train_csv  # noqa: E402
from kaggle_seg.competitions.uwmgi_kaggle import (  # noqa: E402
    validate_submission as validate_uwmgi_submission,
)
from kaggle_seg.data import rle  # noqa: E402
from kaggle_seg.data.folds import read_folds  # noqa: E402
from kaggle_seg.data.rle import decode_rle, validate_rle  # noqa: E402
from kaggle_seg.errors import KsegError  # noqa: E402
from kaggle_seg.io import read_csv_checked  # noqa: E402
from kaggle_seg.prepare import read_table  # noqa: E402
from kaggle_seg.scoring import score_submission  # noqa: E402


def instrument_kseg() -> int:
    """Instrument, in place, every plain Python function and method of kaggle_seg and of the
    reference decoder. numba kernels (dispatchers, not functions) are left alone: numba compiles
    them from their bytecode, which instrumenting changes. So coverage guides by the Python
    around the kernels and by the reference decoder's branches, and the kernels are checked by
    their results. Returns the number of functions instrumented."""
    count = 0
    for name, module in list(sys.modules.items()):
        if not (name.startswith("kaggle_seg") or name == "test_fuzz"):
            continue
        for value in list(vars(module).values()):
            members = vars(value).values() if isinstance(value, type) else [value]
            for member in members:
                if isinstance(member, types.FunctionType) and member.__module__ == name:
                    atheris.instrument_func(member)
                    count += 1
    return count


rle.warmup()

SCRATCH = Path(tempfile.mkdtemp(prefix="kseg_fuzz_"))
TRUTH = SCRATCH / "truth.csv"
TRUTH.write_text("ImageId,EncodedPixels,Height,Width\na,1 2,4,4\nb,,2,7\n")
SHAPES = {"s1": (4, 5), "s2": (3, 3)}
CLASSES = ("large_bowel", "small_bowel", "stomach")


def expect_one_line(call) -> object:
    """`call()`'s result, or None when it refused with a one-line KsegError; anything else
    propagates and atheris reports it."""
    try:
        return call()
    except KsegError as exc:
        if "\n" in str(exc) or not str(exc):
            raise AssertionError(f"KsegError not on one line: {exc!r}") from exc
        return None


def fuzz_rle(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    height, width = provider.ConsumeIntInRange(1, 12), provider.ConsumeIntInRange(1, 12)
    order = "C" if provider.ConsumeBool() else "F"
    text = provider.ConsumeUnicodeNoSurrogates(provider.remaining_bytes())
    expected = reference_pixels(text, height * width)
    mask = expect_one_line(lambda: decode_rle(text, (height, width), order))
    if mask is None:
        if expected is not None:
            raise AssertionError(f"valid RLE {text!r} refused")
        try:
            validate_rle(text, height * width)
        except KsegError:
            return
        raise AssertionError(f"validate_rle accepted {text!r}, which decode_rle refused")
    if expected is None:
        raise AssertionError(f"invalid RLE {text!r} accepted")
    flat = np.zeros(height * width, np.uint8)
    flat[expected] = 1
    if not np.array_equal(mask, flat.reshape((height, width), order=order)):
        raise AssertionError(f"RLE {text!r} decoded wrongly")


def fuzz_csv(data: bytes) -> None:
    path = SCRATCH / "input.csv"
    path.write_bytes(data)
    expect_one_line(lambda: read_csv_checked(path, ["id"]))
    expect_one_line(lambda: read_train_csv(path))
    expect_one_line(lambda: read_folds(path))
    expect_one_line(lambda: read_table(path))
    expect_one_line(lambda: score_submission("dsb2018", TRUTH, path))
    frame = expect_one_line(lambda: read_csv_checked(path, ["id", "class", "predicted"]))
    if frame is not None:
        expect_one_line(lambda: validate_uwmgi_submission(frame, list(SHAPES), SHAPES, CLASSES))


TARGETS = {"rle": fuzz_rle, "csv": fuzz_csv}

# Seeds and a dictionary, so the mutations start from files with the right columns: random
# bytes almost never spell a header kseg reads.
SEEDS = {
    "rle": [b"\x03\x04\x001 2 5 3", b"\x02\x02\x01 1 1  3 1\n"],
    "csv": [
        b"id,class,predicted\ns1,large_bowel,1 2\ns1,small_bowel,\ns1,stomach,3 4\n"
        b"s2,large_bowel,\ns2,small_bowel,1 9\ns2,stomach,\n",
        b"ImageId,EncodedPixels\na,1 2\na,5 3\nb,\n",
        b"id,class,segmentation\ncase1_day0_slice_0001,stomach,1 2\n",
        b"id,fold,group\na,0,a\nb,1,b\n",
        b"id,group,image_path,height,width,empty,n_nuclei\na,a,/x/a.png,4,4,False,2\n"
        b"b,b,/x/b.png,2,7,True,0\n",
    ],
}
TOKENS = {
    "rle": [" ", "\t", "\n", "0", "1", "9", "10", "-1", "99999999999999999999"],
    "csv": ["id", "class", "predicted", "segmentation", "ImageId", "EncodedPixels", "fold",
            "group", "image_path", "height", "width", "empty", "True", "False", "large_bowel",
            "stomach", ",", "\n", '"', "1 2", "s1", "s2", "a", "b"],
}  # fmt: skip


def _escaped(token: str) -> str:
    """A dictionary entry as libFuzzer reads it: printable ASCII as is, the rest as \\xNN."""
    return "".join(
        ch if 32 <= ord(ch) < 127 and ch not in '"\\' else f"\\x{ord(ch):02X}" for ch in token
    )


def libfuzzer_args(target: str, extra: list[str]) -> list[str]:
    """`extra`, plus the target's dictionary and, unless a corpus folder is given, its seeds."""
    folder = Path(tempfile.mkdtemp(prefix=f"kseg_fuzz_{target}_"))
    dictionary = folder / "tokens.dict"
    dictionary.write_text("".join(f'"{_escaped(token)}"\n' for token in TOKENS[target]))
    args = [*extra, f"-dict={dictionary}"]
    if not any(not arg.startswith("-") for arg in extra):
        corpus = folder / "corpus"
        corpus.mkdir()
        for k, seed in enumerate(SEEDS[target]):
            (corpus / f"seed{k}").write_bytes(seed)
        args.append(str(corpus))
    return args


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = TARGETS[sys.argv[1]]

    print(f"instrumented {instrument_kseg()} kaggle_seg functions", flush=True)
    atheris.Setup([sys.argv[0], *libfuzzer_args(sys.argv[1], sys.argv[2:])], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
