"""Run-length encoding of binary masks in Kaggle's "start length start length ..." format.

Starts are 1-indexed pixel numbers in the flattened image, lengths count pixels, tokens are
separated by single spaces, and an empty mask is "". The flattening order differs between
competitions and is therefore always an explicit argument:

- "C": row-major, pixel 1 = (row 0, col 0), then along the first row (UW-Madison GI).
- "F": column-major, pixel 1 = (row 0, col 0), then down the first column (DSB 2018).

numba kernels find the runs and write / parse the ASCII text directly: a 266x266 organ mask
encodes in ~6 us and decodes in ~2-9 us, 10-20x faster than the usual numpy recipes. Decoding
into memory the caller owns (`decode_rle(..., out=)`, a zeroed buffer of which only the runs
are written) and a whole column of rows in one call into one stack (`decode_rles`) spare the
allocation and the Python step per mask (benchmarks/README.md).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Iterable, Sequence
from typing import Literal

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils
from numba.extending import box, intrinsic, models, register_model

from kaggle_seg.errors import RLEError
from kaggle_seg.jit import jit_cache_enabled

RLEOrder = Literal["C", "F"]

__all__ = [
    "RLEOrder",
    "decode_rle",
    "decode_rles",
    "decode_rles_to_labels",
    "encode_rle",
    "encode_rles",
    "rle_area",
    "validate_rle",
    "warmup",
]


_CACHE = jit_cache_enabled(__file__)

# Decode kernels return (pair index << 3) | status; _raise_decode_error spells it out.
_OK = 0
_BAD_TOKEN = 1
_ODD_TOKENS = 2
_START_LT_1 = 3
_LENGTH_LT_1 = 4
_PAST_END = 5
_RUN_ORDER = 6
_INSTANCE_OVERLAP = 7

# uint64 constants: numba turns uint64-with-int64 arithmetic and comparisons into float64.
_ZERO = np.uint64(0)
_ONE = np.uint64(1)
_HIGHS = np.uint64(0x8080808080808080)
# Numbers are saturated here while parsing so that absurd tokens cannot overflow int64.
_SATURATE = 10**17
_WHITESPACE = " \t\n\r\f\v"
# Bytes readable past the end of every text a decode kernel parses: its 8-byte loads need
# them. _padded adds a space first, which the kernels count as part of the text.
_PADDING = 8
_PADDING_BYTES = b" " + bytes(_PADDING)
_UINT8 = np.dtype(np.uint8)
_NDARRAY = np.ndarray


# --------------------------------------------------------------------------------------------
# Encoding kernels
# --------------------------------------------------------------------------------------------


@intrinsic
def _trailing_zeros(typingctx, value):
    """Count trailing zero bits of a uint64, 64 for 0 (LLVM cttz; numba has no public name)."""

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 0))

    return numba.types.uint64(numba.types.uint64), codegen


@intrinsic
def _leading_zeros(typingctx, value):
    """Count leading zero bits of a uint64, 64 for 0 (LLVM ctlz)."""

    def codegen(context, builder, signature, args):
        return builder.ctlz(args[0], ir.Constant(ir.IntType(1), 0))

    return numba.types.uint64(numba.types.uint64), codegen


@intrinsic
def _popcount(typingctx, value):
    """Count set bits of a uint64 (LLVM ctpop)."""

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return numba.types.uint64(numba.types.uint64), codegen


# Hot loops index with uint64 (_u): numba then skips its negative-index wraparound, which
# otherwise costs a compare per load and keeps LLVM from unrolling / vectorising (~3x here).


@numba.njit(cache=_CACHE, nogil=True)
def _u(i: int) -> np.uint64:
    return np.uint64(i)


@intrinsic
def _nonzero_bits64(typingctx, pixels, start):
    """Bit j: pixels[start + j] != 0, for j < 64 (pixels C-contiguous uint8 [N], start uint64,
    no bounds check).

    One 64-byte vector compare (AVX-512: a load, vptestmb, kmovq); LLVM's own vectorisation
    of the equivalent loop took ~40 instructions per 64 pixels.
    """
    if not (
        isinstance(pixels, numba.types.Array)
        and pixels.ndim == 1
        and pixels.layout == "C"
        and pixels.dtype == numba.types.uint8
    ):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        vector = ir.VectorType(ir.IntType(8), 64)
        address = builder.bitcast(builder.gep(array.data, [args[1]]), vector.as_pointer())
        nonzero = builder.icmp_unsigned("!=", builder.load(address, align=1), vector(None))
        return builder.bitcast(nonzero, ir.IntType(64))

    return numba.types.uint64(pixels, numba.types.uint64), codegen


@numba.njit(cache=_CACHE, nogil=True)
def _digit_lanes(value: np.uint64) -> np.uint64:
    """value in [0, 10**8) -> its 8 decimal digits (leading zeros included) as bytes 0..9 of
    a word, the most significant digit in the highest byte.

    SWAR: split into two 4-digit lanes, each into two 2-digit lanes, each into two digits.
    Each split divides by a constant via multiply-shift (exact in these ranges) and moves the
    remainder up with one multiply-add: (x << k) + q * (1 - d * 2**k) = q + ((x - d * q) << k)
    (mod 2**64). Only multiplies, shifts and adds, so that a loop over numbers vectorises (LLVM
    turns a division by a constant into a high multiply, which x86 SIMD lacks for 64 bits).
    """
    high = (value * np.uint64(109951163)) >> np.uint64(40)  # value // 10000
    lanes = (value << np.uint64(32)) + high * np.uint64(2**64 + 1 - (10000 << 32))
    high = ((lanes * np.uint64(10486)) >> np.uint64(20)) & np.uint64(0x0000007F0000007F)
    lanes = (lanes << np.uint64(16)) + high * np.uint64(2**64 + 1 - (100 << 16))
    high = ((lanes * np.uint64(103)) >> np.uint64(10)) & np.uint64(0x000F000F000F000F)
    return (lanes << np.uint64(8)) + high * np.uint64(2**64 + 1 - (10 << 8))


@numba.njit(cache=_CACHE, nogil=True)
def _ascii_digits8(value: np.uint64) -> np.uint64:
    """value in [1, 10**8) -> its decimal digits as the ASCII bytes of a word, the first in
    the lowest byte, zero bytes above the last (the leading zero digits are the trailing
    zero bytes of _digit_lanes)."""
    lanes = _digit_lanes(value)
    leading_zero_bits = _trailing_zeros(lanes) & np.uint64(56)
    return (lanes + np.uint64(0x3030303030303030)) >> leading_zero_bits


@numba.njit(cache=_CACHE, nogil=True)
def _spaced_digits6(value: np.uint64) -> np.uint64:
    """value in [1, 10**6) -> " " and its decimal digits as the ASCII bytes of a word (the
    space in the lowest byte, at most 7 bytes), and in the top byte their count."""
    lanes = _digit_lanes(value)
    leading_zero_bits = _trailing_zeros(lanes) & np.uint64(56)
    digits = (lanes + np.uint64(0x3030303030303030)) >> leading_zero_bits
    n_bytes = np.uint64(72) - leading_zero_bits  # (digits + 1) * 8
    return (digits << np.uint64(8)) | np.uint64(32) | (n_bytes << np.uint64(53))


@numba.njit(cache=_CACHE, nogil=True)
def _write_int_wide(buf: np.ndarray, pos: int, value: int) -> int:
    """Write value (>= 0) in decimal at buf[pos:], return the position after it."""
    v = np.uint64(value)
    n_digits = 1
    power = np.uint64(10)
    while n_digits < 20 and v >= power:
        n_digits += 1
        power *= np.uint64(10)
    for p in range(pos + n_digits - 1, pos - 1, -1):
        buf[p] = np.uint8(48) + np.uint8(v % np.uint64(10))
        v //= np.uint64(10)
    return pos + n_digits


@numba.njit(cache=_CACHE, nogil=True)
def _write_runs(buf: np.ndarray, pos: int, bounds: np.ndarray, n_runs: int) -> int:
    """Append " start length" per run to buf[:pos]; bounds [2 * n_runs] holds 0-indexed
    (first pixel, pixel after the last) pairs, sorted; it is overwritten. buf needs 8 bytes
    of slack.

    The digits of all numbers are made first, in place of bounds[:2 * n_runs], in a loop
    that LLVM vectorises; then each number is placed with an 8-byte store, the bytes past it
    junk that the next one overwrites. Below 10**6 (the last end is the largest number) a
    word holds the space, the digits and their count, so placing a number is a store and an
    add; below 10**8 the count comes from the word's leading zeros and the space is a
    separate store; above, a scalar writer.
    """
    if n_runs == 0:
        return pos
    last = bounds[2 * n_runs - 1]
    words = bounds.view(np.uint64)
    at = _u(pos)
    if last < 1000000:
        for r in range(n_runs):
            first = words[_u(2 * r)]
            after = words[_u(2 * r + 1)]
            words[_u(2 * r)] = _spaced_digits6(first + _ONE)
            words[_u(2 * r + 1)] = _spaced_digits6(after - first)
        for i in range(2 * n_runs):
            word = words[_u(i)]
            for j in range(8):  # LLVM merges these into one unaligned store
                buf[at + _u(j)] = np.uint8(word >> _u(8 * j))
            at += word >> np.uint64(56)
        return np.int64(at)
    if last < 100000000:
        for r in range(n_runs):
            first = words[_u(2 * r)]
            after = words[_u(2 * r + 1)]
            words[_u(2 * r)] = _ascii_digits8(first + _ONE)
            words[_u(2 * r + 1)] = _ascii_digits8(after - first)
        for i in range(2 * n_runs):
            word = words[_u(i)]
            buf[at] = 32
            for j in range(8):
                buf[at + _u(j + 1)] = np.uint8(word >> _u(8 * j))
            at += ((np.uint64(71) - _leading_zeros(word)) >> np.uint64(3)) + _ONE  # digits, space
        return np.int64(at)
    for r in range(n_runs):
        buf[pos] = 32
        pos = _write_int_wide(buf, pos + 1, bounds[2 * r] + 1)
        buf[pos] = 32
        pos = _write_int_wide(buf, pos + 1, bounds[2 * r + 1] - bounds[2 * r])
    return pos


_FLUSH_BOUNDS = 64  # run boundaries gathered before _encode_kernel writes them as text


@numba.njit(cache=_CACHE, nogil=True, inline="always")
def _block_bounds(
    bits: np.uint64, state: np.uint64, base: int, bounds: np.ndarray, n_bounds: np.uint64
) -> np.uint64:
    """Append the run boundaries in a 64-pixel block (bits: its nonzero pixels, state: the
    pixel before it) to bounds[:n_bounds]; return the new count.

    Bit i of changes is set where pixel i differs from pixel i - 1; its set bits
    (count-trailing-zeros) are the boundaries. 2 are stored unconditionally (88 % of the
    organ masks' blocks with boundaries have at most 2; ctz(0) = 64, so stores past the count
    are junk that later ones overwrite): most blocks take no branch that depends on where the
    runs are. With the mask streaming from memory, every such branch tried (skipping blocks
    or 256-pixel chunks without boundaries, fewer unconditional stores) was slower than
    treating all blocks alike, though faster on a mask already in cache.
    """
    changes = bits ^ ((bits << _ONE) | state)
    end = n_bounds + _popcount(changes)
    for j in range(2):
        bounds[n_bounds + _u(j)] = base + np.int64(_trailing_zeros(changes))
        changes &= changes - _ONE
    n_bounds += _u(2)
    while changes != _ZERO:
        bounds[n_bounds] = base + np.int64(_trailing_zeros(changes))
        changes &= changes - _ONE
        n_bounds += _ONE
    return end


@numba.njit(cache=_CACHE, nogil=True)
def _encode_kernel(pixels: np.ndarray, buf: np.ndarray) -> int:
    """Write " start length start length ..." for flat pixels [N] (uint8, nonzero = foreground)
    into buf; return its length (the text proper is buf[1:length]).

    One 64-byte vector compare per 64-pixel block (_nonzero_bits64), its boundaries listed by
    _block_bounds; every _FLUSH_BOUNDS boundaries the complete runs become text, in small
    batches. The last N % 64 pixels are read after the scan, not before it: a first load at
    the far end of a mask that is not in cache stalls the scan's start (~0.2 us of a 266x266
    encode).
    """
    n = pixels.size
    n_full = n >> 6
    bounds = np.empty(_FLUSH_BOUNDS + 64, dtype=np.int64)
    n_bounds = _ZERO
    pos = 0
    state = _ZERO  # the previous pixel: 0 background, 1 foreground
    for block in range(n_full):
        bits = _nonzero_bits64(pixels, _u(block << 6))
        n_bounds = _block_bounds(bits, state, block << 6, bounds, n_bounds)
        state = bits >> np.uint64(63)
        if n_bounds >= _FLUSH_BOUNDS:
            pos = _write_runs(buf, pos, bounds, np.int64(n_bounds >> _ONE))
            bounds[0] = bounds[n_bounds - _ONE]  # the start of a run still open, if any
            n_bounds &= _ONE
    tail = _ZERO  # the last N % 64 pixels, then background so that an open run ends at N
    for k in range(n_full << 6, n):
        tail |= _u(pixels[k] != 0) << _u(k - (n_full << 6))
    n_bounds = _block_bounds(tail, state, n_full << 6, bounds, n_bounds)
    return _write_runs(buf, pos, bounds, np.int64(n_bounds >> _ONE))


_BOUNDS_CHUNK = 4096  # run boundaries collected before they are written out as text


@numba.njit(cache=_CACHE, nogil=True)
def _add_bound(
    buf: np.ndarray, pos: int, bounds: np.ndarray, n_bounds: int, value: int
) -> tuple[int, int]:
    """Append a run boundary; write the complete runs out when bounds is full."""
    bounds[n_bounds] = value
    n_bounds += 1
    if n_bounds == bounds.size:
        pos = _write_runs(buf, pos, bounds, n_bounds >> 1)
        bounds[0] = bounds[n_bounds - 1]  # an odd count leaves a run open
        n_bounds &= 1
    return pos, n_bounds


@numba.njit(cache=_CACHE, nogil=True)
def _encode_columns_kernel(mask: np.ndarray, buf: np.ndarray) -> int:
    """_encode_kernel for column-major numbering of a C-contiguous mask [H, W] (uint8).

    Instead of transposing, one vectorised pass finds the columns and the rows that hold
    foreground; only that box is then read, down the columns. A DSB nucleus covers a small
    box, so this reads a few hundred pixels of the column-major order instead of all of them.
    """
    height, width = mask.shape
    column_any = np.zeros(width, dtype=np.uint8)
    first_row, last_row = height, -1
    for r in range(height):
        row_any = np.uint8(0)
        for c in range(width):
            column_any[c] |= mask[r, c]
            row_any |= mask[r, c]
        if row_any != 0:
            first_row = min(first_row, r)
            last_row = r
    bounds = np.empty(_BOUNDS_CHUNK, dtype=np.int64)
    n_bounds = 0
    pos = 0
    state = False  # the previous pixel (column-major) is foreground
    after = 0  # column-major index after the last pixel read
    for c in range(width):
        if column_any[c] == 0:
            continue
        p = c * height + first_row
        if state and p != after:  # the pixels skipped since then are background
            pos, n_bounds = _add_bound(buf, pos, bounds, n_bounds, after)
            state = False
        for r in range(first_row, last_row + 1):
            foreground = mask[r, c] != 0
            if foreground != state:
                pos, n_bounds = _add_bound(buf, pos, bounds, n_bounds, p)
                state = foreground
            p += 1
        after = p
    if state:
        pos, n_bounds = _add_bound(buf, pos, bounds, n_bounds, after)
    return _write_runs(buf, pos, bounds, n_bounds >> 1)


# The encoders return their text as a str made on the kernel's own return path, straight
# from the text buffer (one copy), with no buffer passed in and no memoryview, slice or
# decode call in Python. In the benchmark's setting (each mask read from memory, which also
# evicts the interpreter's data from L1) slicing and decoding in Python cost ~0.8 us of a
# ~7 us encode, the boxing here ~0.5 us.


class _AsciiTextType(numba.types.Type):
    """ASCII bytes in an NRT-owned buffer, boxed as a Python str."""

    def __init__(self) -> None:
        super().__init__(name="kaggle_seg.AsciiText")


_ASCII_TEXT = _AsciiTextType()


@register_model(_AsciiTextType)
class _AsciiTextModel(models.StructModel):
    def __init__(self, dmm, fe_type):
        members = [
            ("meminfo", numba.types.MemInfoPointer(numba.types.voidptr)),  # keeps data alive
            ("data", numba.types.voidptr),
            ("length", numba.types.intp),
        ]
        super().__init__(dmm, fe_type, members)


@intrinsic
def _ascii_text(typingctx, buf, start, stop):
    """buf[start:stop] (uint8 [N], C-contiguous, ASCII) as an _AsciiTextType sharing buf."""
    if not (isinstance(buf, numba.types.Array) and buf.layout == "C" and buf.ndim == 1):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        context.nrt.incref(builder, signature.args[0], args[0])  # the text's reference
        text = cgutils.create_struct_proxy(_ASCII_TEXT)(context, builder)
        text.meminfo = array.meminfo
        text.data = builder.bitcast(builder.gep(array.data, [args[1]]), ir.IntType(8).as_pointer())
        text.length = builder.sub(args[2], args[1])
        return text._getvalue()

    return _ASCII_TEXT(buf, numba.types.intp, numba.types.intp), codegen


@box(_AsciiTextType)
def _box_ascii_text(typ, val, c):
    text = cgutils.create_struct_proxy(typ)(c.context, c.builder, value=val)
    one_byte_kind = ir.Constant(ir.IntType(32), 1)  # PyUnicode_1BYTE_KIND: ASCII gives ASCII
    result = c.pyapi.string_from_kind_and_data(one_byte_kind, text.data, text.length)
    c.context.nrt.decref(c.builder, typ, val)
    return result


@numba.njit(cache=_CACHE, nogil=True)
def _text_capacity(n_pixels: int) -> int:
    """Bytes of text buffer that any mask of n_pixels fits in: a run every other pixel, each
    " start length" at most 2 * (digits + 1) bytes, + 8 for _write_runs' scribbling. Only
    the pages the text reaches are ever touched."""
    digits = 1
    power = 10
    while power <= n_pixels:
        digits += 1
        power *= 10
    return (n_pixels + 1) // 2 * (2 * digits + 2) + 8


@numba.njit(cache=_CACHE, nogil=True)
def _encode_text(mask: np.ndarray) -> str:
    """_encode_kernel's text for mask [H, W] (uint8, row-major numbering) as a str.

    Takes the 2-D mask, not its ravel: one Python call less per encode. numba ravels it, a
    view when it is C-contiguous (other layouts compile their own copy of this on first use).
    """
    buf = np.empty(_text_capacity(mask.size), dtype=np.uint8)
    length = _encode_kernel(mask.ravel(), buf)
    return _ascii_text(buf, min(length, 1), length)


@numba.njit(cache=_CACHE, nogil=True)
def _encode_columns_text(mask: np.ndarray) -> str:
    """_encode_columns_kernel's text for a C-contiguous mask [H, W] (uint8) as a str."""
    buf = np.empty(_text_capacity(mask.size), dtype=np.uint8)
    length = _encode_columns_kernel(mask, buf)
    return _ascii_text(buf, min(length, 1), length)


# --------------------------------------------------------------------------------------------
# Decoding kernels: they read the RLE's ASCII bytes directly (numba takes `bytes` as a
# read-only uint8 buffer, no numpy wrapper needed; the batch kernels take one uint8 array
# holding every row). _parse_runs turns a text into validated (start, length) pairs, which
# the kernels then write.
# --------------------------------------------------------------------------------------------


@numba.njit(cache=_CACHE, nogil=True)
def _is_space(byte: np.uint8) -> bool:
    return byte == 32 or (byte >= 9 and byte <= 13)


@numba.njit(cache=_CACHE, nogil=True, inline="always")
def _parse_digits8(text: bytes, i: int) -> tuple[int, int, bool]:
    """SWAR parse of the token at text[i : i + 8] (needs i + 8 <= len(text)): (number of
    leading digits, their value, whether a space follows them within the 8 bytes); 8 digits
    or more report 8 and no value."""
    word = _ZERO
    for j in range(8):  # LLVM merges these into one unaligned load
        word |= np.uint64(text[_u(i + j)]) << _u(8 * j)
    digits = word ^ np.uint64(0x3030303030303030)  # '0'..'9' -> 0..9
    # A byte is not a digit iff its high nibble is set now or its low nibble is > 9.
    bad = (digits & np.uint64(0xF0F0F0F0F0F0F0F0)) | (
        ((digits & np.uint64(0x0F0F0F0F0F0F0F0F)) + np.uint64(0x0606060606060606))
        & np.uint64(0x1010101010101010)
    )
    bad = (((bad & np.uint64(0x7F7F7F7F7F7F7F7F)) + np.uint64(0x7F7F7F7F7F7F7F7F)) | bad) & _HIGHS
    zeros = _trailing_zeros(bad)  # 8 * digits + 7, or 64 when all 8 bytes are digits
    bits = zeros & np.uint64(56)
    # The byte after the digits, from the same word: no second, dependent load.
    spaced = ((word >> bits) & np.uint64(0xFF)) == np.uint64(32)
    # Shift the digits to the top (leading zeros below), then combine pairs, quads, octets.
    value = (digits << _ONE) << (np.uint64(63) - bits)  # no shift by 64 when bits is 0
    value = (value * np.uint64(10 * 256 + 1)) >> np.uint64(8)
    value = ((value & np.uint64(0x00FF00FF00FF00FF)) * np.uint64(100 * 65536 + 1)) >> _u(16)
    value = ((value & np.uint64(0x0000FFFF0000FFFF)) * np.uint64(10000 * 2**32 + 1)) >> _u(32)
    return np.int64(zeros >> np.uint64(3)), np.int64(value & np.uint64(0xFFFFFFFF)), spaced


@numba.njit(cache=_CACHE, nogil=True)
def _read_number_slow(text: bytes, i: int, end: int) -> tuple[int, int]:
    """Skip whitespace, read one token of text[:end]: (position after, value); value -1 if
    there is no token, -2 if it is not all digits. Saturates at ~1e18 so absurd numbers fail
    the image-end check instead of overflowing. Only for what _parse_runs' fast path leaves:
    other whitespace, long or bad tokens, the end of a text."""
    while i < end and _is_space(text[_u(i)]):
        i += 1
    if i >= end:
        return i, -1
    first = i
    value = 0
    while i < end:
        digit = np.int64(text[_u(i)]) - 48
        if digit < 0 or digit > 9:
            break
        if value < _SATURATE:
            value = value * 10 + digit
        i += 1
    if i == first or (i < end and not _is_space(text[_u(i)])):
        return i, -2
    return i, value


@numba.njit(cache=_CACHE, nogil=True)
def _check_run(start: int, length: int, prev_end: int, n_pixels: int) -> int:
    """Status of the run start..start+length-1 (1-indexed) after a run ending at prev_end."""
    if start < 1:
        return _START_LT_1
    if length < 1:
        return _LENGTH_LT_1
    if start + length - 1 > n_pixels:
        return _PAST_END
    if start <= prev_end:  # touching runs (start == prev_end + 1) are fine
        return _RUN_ORDER
    return _OK


@numba.njit(cache=_CACHE, nogil=True, inline="always")
def _parse_runs(text, i: int, end: int, n_pixels: int, runs: np.ndarray) -> tuple[int, int]:
    """The RLE text[i:end] (bytes or uint8 array, with at least 8 readable bytes past `end`:
    see _padded) as 0-indexed (first pixel, length) pairs in runs[:2 * n], checked against
    an image of n_pixels: returns (n, _OK) or (n, (pair << 3) | status) at the first bad pair.
    runs needs room for (end - i) // 2 + 2 numbers.

    A 1-7 digit token followed by a space within text[:end] is read with one 8-byte load
    (_parse_digits8), anything else by _read_number_slow. Written as one flat loop over pairs,
    loads first and checks after: each alternative tried (a reader function, a loop over
    tokens, the bounds check first) ran ~3x slower.
    """
    n = 0
    prev_end = 0  # 1-indexed last pixel of the previous run
    while True:
        n_digits, start, spaced = _parse_digits8(text, i)
        if n_digits > 0 and n_digits < 8 and spaced and i + n_digits < end:
            i += n_digits + 1
        else:
            i, start = _read_number_slow(text, i, end)
            if start < 0:
                return n, (_OK if start == -1 else (n << 3) | _BAD_TOKEN)
        n_digits, length, spaced = _parse_digits8(text, i)
        if n_digits > 0 and n_digits < 8 and spaced and i + n_digits < end:
            i += n_digits + 1
        else:
            i, length = _read_number_slow(text, i, end)
            if length < 0:
                return n, (n << 3) | (_ODD_TOKENS if length == -1 else _BAD_TOKEN)
        status = _check_run(start, length, prev_end, n_pixels)
        if status != _OK:
            return n, (n << 3) | status
        prev_end = start + length - 1
        runs[2 * n] = start - 1
        runs[2 * n + 1] = length
        n += 1


@numba.njit(cache=_CACHE, nogil=True, inline="always")
def _set_span(flat: np.ndarray, first: int, stop: int, value: np.uint8) -> None:
    """flat[first:stop] = value as a plain loop, which LLVM turns into a memset (numba's slice
    assignment goes through its generic strided path, slower on a 266x266 mask)."""
    for p in range(first, stop):
        flat[_u(p)] = value


@numba.njit(cache=_CACHE, nogil=True, inline="always")
def _write_runs_c(runs: np.ndarray, n_runs: int, flat: np.ndarray, write_gaps: bool) -> None:
    """Runs (0-indexed first pixel, length) set to 1 in flat [H * W] (row-major numbering);
    with `write_gaps` every other pixel set to 0, in the same pass (else flat is zero)."""
    after = 0
    for r in range(n_runs):
        first = runs[2 * r]
        if write_gaps:
            _set_span(flat, after, first, np.uint8(0))
        after = first + runs[2 * r + 1]
        _set_span(flat, first, after, np.uint8(1))
    if write_gaps:
        _set_span(flat, after, flat.size, np.uint8(0))


@numba.njit(cache=_CACHE, nogil=True, inline="always")
def _write_runs_f(runs: np.ndarray, n_runs: int, out: np.ndarray, write_gaps: bool) -> None:
    """As _write_runs_c for column-major numbering, into a C-order out [H, W]."""
    height = out.shape[0]
    if write_gaps:
        _set_span(out.reshape(-1), 0, out.size, np.uint8(0))
    for r in range(n_runs):
        row, col = runs[2 * r] % height, runs[2 * r] // height
        remaining = runs[2 * r + 1]
        while remaining > 0:  # one column segment at a time
            segment = min(remaining, height - row)
            for y in range(row, row + segment):
                out[y, col] = 1
            remaining -= segment
            row = 0
            col += 1


@numba.njit(cache=_CACHE, nogil=True)
def _decode_kernel(text: bytes, out: np.ndarray, column_major: bool, write_gaps: bool) -> int:
    """One RLE (text from _padded) into out [H, W] (C-contiguous uint8): _OK or
    (pair << 3) | status.

    write_gaps: every pixel is written (no zeroing pass needed); else out must be zero and
    only the runs are written. On error out holds nothing useful.
    """
    end = len(text) - _PADDING
    runs = np.empty(end // 2 + 2, dtype=np.int64)
    n_runs, result = _parse_runs(text, 0, end, out.size, runs)
    if result != _OK:
        return result
    if column_major:
        _write_runs_f(runs, n_runs, out, write_gaps)
    else:
        _write_runs_c(runs, n_runs, out.reshape(-1), write_gaps)
    return _OK


@numba.njit(cache=_CACHE, nogil=True)
def _decode_rows_kernel(
    text: np.ndarray,
    bounds: np.ndarray,
    out: np.ndarray,
    starts: np.ndarray,
    heights: np.ndarray,
    widths: np.ndarray,
    column_major: bool,
) -> tuple[int, int]:
    """Row r's RLE, text[bounds[r]:bounds[r + 1]], OR-ed into the zeroed image
    out[starts[r] : starts[r] + heights[r] * widths[r]] (out: flat uint8, C order per image).

    One call for all rows: no Python step per row. Returns (-1, _OK), or the first failing
    row and its (pair << 3) | status.
    """
    longest = np.max(np.diff(bounds)) if bounds.size > 1 else 0
    runs = np.empty(longest // 2 + 2, dtype=np.int64)
    for r in range(bounds.size - 1):
        size = heights[r] * widths[r]
        n_runs, result = _parse_runs(text, bounds[r], bounds[r + 1], size, runs)
        if result != _OK:
            return r, result
        image = out[starts[r] : starts[r] + size]
        if column_major:
            _write_runs_f(runs, n_runs, image.reshape((heights[r], widths[r])), False)
        else:
            _write_runs_c(runs, n_runs, image, False)
    return -1, _OK


@numba.njit(cache=_CACHE, nogil=True)
def _decode_labels_kernel(
    text: np.ndarray, bounds: np.ndarray, out: np.ndarray, column_major: bool
) -> tuple[int, int]:
    """Instance r's RLE, text[bounds[r]:bounds[r + 1]], written as label r + 1 into the int32
    label map out [H, W] (C-contiguous; zero, or holding labels of earlier instances).

    Returns (-1, _OK), or the failing row and (pair << 3) | status; for _INSTANCE_OVERLAP
    (flat C index of the first pixel already labelled << 3) | 7, that pixel still holding the
    other instance's label (each pixel is checked before it is written).
    """
    height, width = out.shape
    flat = out.reshape(-1)
    longest = np.max(np.diff(bounds)) if bounds.size > 1 else 0
    runs = np.empty(longest // 2 + 2, dtype=np.int64)
    for r in range(bounds.size - 1):
        label = np.int32(r + 1)
        n_runs, result = _parse_runs(text, bounds[r], bounds[r + 1], out.size, runs)
        if result != _OK:
            return r, result
        for k in range(n_runs):
            first, length = runs[2 * k], runs[2 * k + 1]
            if column_major:
                row, col = first % height, first // height
                while length > 0:
                    segment = min(length, height - row)
                    for y in range(row, row + segment):
                        if out[y, col] != 0:
                            return r, ((y * width + col) << 3) | _INSTANCE_OVERLAP
                        out[y, col] = label
                    length -= segment
                    row = 0
                    col += 1
            else:
                for p in range(first, first + length):
                    if flat[p] != 0:
                        return r, (p << 3) | _INSTANCE_OVERLAP
                    flat[p] = label
    return -1, _OK


@numba.njit(cache=_CACHE, nogil=True)
def _scan_kernel(text: bytes, n_pixels: int) -> tuple[int, int]:
    """Validate RLE text (from _padded) for an image of n_pixels: (_OK or (pair << 3) |
    status, area)."""
    end = len(text) - _PADDING
    runs = np.empty(end // 2 + 2, dtype=np.int64)
    n_runs, result = _parse_runs(text, 0, end, n_pixels, runs)
    if result != _OK:
        return result, 0
    area = 0
    for r in range(n_runs):
        area += runs[2 * r + 1]
    return _OK, area


# --------------------------------------------------------------------------------------------
# Python API
# --------------------------------------------------------------------------------------------


def _check_order(order: str) -> bool:
    """True for column-major ("F"); raises ValueError for anything but "C" / "F"."""
    if order == "C":
        return False
    if order == "F":
        return True
    raise ValueError(f"RLE order must be 'C' (row-major) or 'F' (column-major), got {order!r}")


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """(H, W) as two positive ints; RLEError otherwise."""
    try:
        height, width = shape
        height, width = operator.index(height), operator.index(width)
    except (TypeError, ValueError):
        raise RLEError(f"shape must be two integers (height, width), got {shape!r}") from None
    if height < 1 or width < 1:
        raise RLEError(f"shape must be two positive integers (height, width), got {shape!r}")
    return height, width


def _rle_bytes(rle: object) -> bytes:
    """The RLE's ASCII bytes for the kernels; "", None, NaN and pd.NA (empty CSV cells) give b""."""
    if isinstance(rle, str):
        return rle.encode()
    if (
        rle is None
        or (isinstance(rle, float) and math.isnan(rle))
        or type(rle).__name__ == "NAType"  # pandas' string dtype; not worth importing pandas
    ):
        return b""
    raise RLEError(f"RLE must be a string, None or NaN, got {type(rle).__name__}: {rle!r}")


def _padded(rle: object) -> bytes:
    """The RLE's bytes as the kernels read them: a space after the text (so its last token
    takes the 8-byte fast path too), then _PADDING spare bytes (so no 8-byte load reads past
    the buffer)."""
    return _rle_bytes(rle) + _PADDING_BYTES


def _raise_decode_error(rle: str, result: int, n_pixels: int, image: str) -> None:
    """Turn a kernel result into an RLEError quoting the offending pair; only on the error path."""
    status, pair = result & 7, result >> 3
    tokens = re.split(f"[{_WHITESPACE}]+", rle.strip(_WHITESPACE))
    quoted = " ".join(tokens[2 * pair : 2 * pair + 2])
    where = f"pair {pair} ({quoted!r}, tokens {2 * pair}-{2 * pair + 1})"
    if status == _BAD_TOKEN:
        k = 2 * pair if not re.fullmatch("[0-9]+", tokens[2 * pair]) else 2 * pair + 1
        what = "negative" if re.fullmatch(r"-[0-9]+", tokens[k]) else "not a non-negative integer"
        raise RLEError(f"token {k} ({tokens[k]!r}) at {where} is {what}")
    if status == _ODD_TOKENS:
        raise RLEError(
            f"odd number of tokens ({len(tokens)}): the last start {tokens[-1]!r} "
            f"(token {len(tokens) - 1}) has no length"
        )
    start, length = int(tokens[2 * pair]), int(tokens[2 * pair + 1])
    if status == _START_LT_1:
        raise RLEError(f"start {start} < 1 at {where} (starts are 1-indexed)")
    if status == _LENGTH_LT_1:
        raise RLEError(f"length {length} < 1 at {where}")
    if status == _PAST_END:
        raise RLEError(
            f"run past the image end at {where}: it ends at pixel {start + length - 1}, "
            f"the image has {n_pixels} pixels ({image})"
        )
    if status == _RUN_ORDER:
        prev_start, prev_length = int(tokens[2 * pair - 2]), int(tokens[2 * pair - 1])
        prev_end = prev_start + prev_length - 1
        prev = f"previous run '{prev_start} {prev_length}' (pixels {prev_start}-{prev_end})"
        if start >= prev_start:
            raise RLEError(f"runs overlap at {where}: start {start} is inside the {prev}")
        raise RLEError(f"runs not sorted at {where}: start {start} comes before the {prev}")
    raise AssertionError(f"unknown RLE kernel result {result}")  # pragma: no cover


def _size_words(height: int, width: int) -> str:
    """An image's size as kseg's other messages give it: "360x310, W x H" (a bare "310 x 360"
    read as W x H, the way sizes are written elsewhere, swaps the sides of a non-square scan)."""
    return f"{width}x{height}, W x H"


def _as_uint8(mask: np.ndarray) -> np.ndarray:
    """mask [H, W] as uint8 with the same zero / nonzero pixels, a view where possible."""
    if mask.dtype.itemsize == 1 and mask.dtype.kind in "biu":
        return mask.view(_UINT8)  # bool and int8 share uint8's zero byte
    return (mask != 0).view(_UINT8)


def encode_rle(mask: np.ndarray, order: RLEOrder) -> str:
    """Encode a binary mask as a Kaggle RLE string.

    Args:
        mask: [H, W] any dtype; nonzero = foreground.
        order: "C" (row-major) or "F" (column-major) pixel numbering.

    Returns:
        "start length start length ..." with 1-indexed starts, single spaces and maximal runs
        (never two touching runs); "" for an empty mask.
    """
    if type(mask) is not _NDARRAY:  # lists, and subclasses (np.matrix ravels to 2-D)
        mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {mask.shape}")
    if mask.dtype is not _UINT8:
        mask = _as_uint8(mask)
    if order == "C":  # tested first and inline: each Python step here is ~2 % of an encode
        return _encode_text(mask)
    if _check_order(order) and mask.flags.f_contiguous:  # _check_order raises unless "F"
        return _encode_text(mask.T)  # C-contiguous: its row-major order is mask's column-major
    return _encode_columns_text(np.ascontiguousarray(mask))


_COLUMN_MAJOR = {"C": False, "F": True}


def _check_out(out: np.ndarray, shape: tuple[int, ...], dtype: np.dtype, what: str) -> np.ndarray:
    """`out` as a writeable C-contiguous array of `shape` and `dtype` (bool counts as uint8),
    viewed as `dtype`; ValueError naming what is wrong otherwise."""
    if not isinstance(out, np.ndarray):
        raise ValueError(f"{what} must be a numpy array, got {type(out).__name__}")
    kind_ok = out.dtype == dtype or (dtype == _UINT8 and out.dtype == np.bool_)
    if not kind_ok or out.shape != shape or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(
            f"{what} must be a writeable C-contiguous {dtype} array of shape {shape}, got "
            f"{out.dtype} {out.shape}"
            + ("" if out.flags.c_contiguous else ", not C-contiguous")
            + ("" if out.flags.writeable else ", read-only")
        )
    return out.view(dtype)


def decode_rle(
    rle: str | float | None,
    shape: tuple[int, int],
    order: RLEOrder,
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Decode a Kaggle RLE string into a binary mask.

    Args:
        rle: "start length ..." (1-indexed starts, whitespace-separated); "", None, NaN and
            pd.NA decode to an empty mask.
        shape: (H, W) of the image.
        order: "C" (row-major) or "F" (column-major) pixel numbering.
        out: a caller's zeroed uint8 (or bool) [H, W] C-contiguous buffer to decode into:
            only the runs are written (1), so nothing is allocated and pixels outside the runs
            are not touched. Pixels already set stay set (an OR). On error it holds part of
            the mask.

    Returns:
        [H, W] uint8 mask of 0 / 1, C-contiguous in either order (`out` itself when given).

    Raises:
        RLEError: odd number of tokens, a token that is not a non-negative integer, start or
            length < 1, a run past the image end, unsorted or overlapping runs. Touching runs
            are accepted.
    """
    column_major = _COLUMN_MAJOR.get(order)
    if column_major is None:
        _check_order(order)  # raises
    if (
        type(shape) is tuple
        and len(shape) == 2
        and type(shape[0]) is int
        and type(shape[1]) is int
        and shape[0] > 0
        and shape[1] > 0
    ):
        height, width = shape  # the common case, without _check_shape's conversions
    else:
        height, width = _check_shape(shape)
    if out is None:
        # Every pixel is written (gaps 0, runs 1): one pass, no zeroing pass before it.
        target = np.empty((height, width), dtype=_UINT8)
        write_gaps = True
    else:
        target = _check_out(out, (height, width), _UINT8, "out")
        write_gaps = False
    result = _decode_kernel(_padded(rle), target, column_major, write_gaps)
    if result != _OK:
        _raise_decode_error(rle, result, height * width, _size_words(height, width))
    return target if out is None else out


def encode_rles(masks: Iterable[np.ndarray] | np.ndarray, order: RLEOrder) -> list[str]:
    """Encode many masks: [N, H, W] array or an iterable of [H, W] masks -> N RLE strings."""
    return [encode_rle(mask, order) for mask in masks]


def _row_name(i: int, labels: Sequence[str] | None) -> str:
    """ "row i (id=...)" for error messages; labels may be a pandas Series (by position)."""
    return f"row {i}" if labels is None else f"row {i} (id={list(labels)[i]})"


def _pack_texts(rles: Sequence[object]) -> tuple[np.ndarray, np.ndarray]:
    """All rows' ASCII bytes in one uint8 array and the int64 [N + 1] bounds of each row
    (row r is text[bounds[r]:bounds[r + 1]])."""
    encoded = [_rle_bytes(rle) for rle in rles]
    bounds = np.zeros(len(encoded) + 1, dtype=np.int64)
    # Each row ends in a space and the text in _PADDING spare bytes (see _padded).
    np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)) + 1, out=bounds[1:])
    text = b" ".join(encoded) + b" " + bytes(_PADDING) if encoded else bytes(_PADDING)
    return np.frombuffer(text, dtype=_UINT8), bounds


def _single_shape(shapes: object) -> bool:
    return (
        isinstance(shapes, tuple | list)
        and len(shapes) == 2
        and all(isinstance(x, int | np.integer) for x in shapes)
    )


def decode_rles(
    rles: Sequence[str | float | None],
    shapes: tuple[int, int] | Sequence[tuple[int, int]],
    order: RLEOrder,
    *,
    labels: Sequence[str] | None = None,
    out: np.ndarray | None = None,
    index: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray | list[np.ndarray]:
    """Decode a column of RLE strings (e.g. a CSV column) into one stack of binary masks, in a
    single numba call (no Python step per row).

    Args:
        rles: N RLE strings; "", None, NaN and pd.NA are empty masks.
        shapes: one (H, W) for all rows, or N of them (e.g. DSB's Height / Width columns).
        order: "C" (row-major) or "F" (column-major) pixel numbering.
        labels: N row names (e.g. image ids) used in error messages.
        out: one shape only: a caller's zeroed uint8 (or bool) [M, H, W] C-contiguous stack;
            row i is OR-ed into out[index[i]] (out[i] without `index`), so rows sharing a
            slot are united and only the runs' pixels are written.
        index: N slots of `out` (or of the returned stack, then M = max(index) + 1).

    Returns:
        One shape: the uint8 [M, H, W] stack of 0 / 1 (`out` when given; M = N without
        `index`). Several shapes: N masks [H_i, W_i], views into one zeroed buffer.

    Raises:
        RLEError: as decode_rle, prefixed with the row: "row 17 (id=abc): runs overlap at ...".
    """
    column_major = _check_order(order)
    rles = list(rles)  # by position, also for a pandas Series
    n = len(rles)
    if _single_shape(shapes):
        height, width = _check_shape(shapes)
        heights = np.full(n, height, dtype=np.int64)
        widths = np.full(n, width, dtype=np.int64)
        slots = np.arange(n, dtype=np.int64) if index is None else np.asarray(index, np.int64)
        if slots.shape != (n,):
            raise ValueError(f"index has {slots.size} entries for {n} RLE strings")
        if out is None:
            depth = int(slots.max()) + 1 if n else 0
            # np.zeros: fresh pages come zeroed from the OS, so only the runs are written.
            stack = np.zeros((depth, height, width), dtype=_UINT8)
        else:
            if out.ndim != 3:
                raise ValueError(f"out must be a stack [M, H, W], got shape {out.shape}")
            stack = _check_out(out, (out.shape[0], height, width), _UINT8, "out")
        if n and (slots.min() < 0 or slots.max() >= stack.shape[0]):
            raise ValueError(f"index must lie in [0, {stack.shape[0]}) for a stack of that depth")
        starts = slots * (height * width)
    else:
        if out is not None or index is not None:
            raise ValueError("out= and index= need one (H, W) for all rows")
        shapes = list(shapes)
        if len(shapes) != n:
            raise RLEError(f"got {n} RLE strings but {len(shapes)} shapes")
        heights = np.empty(n, dtype=np.int64)
        widths = np.empty(n, dtype=np.int64)
        for i, shape in enumerate(shapes):
            try:
                heights[i], widths[i] = _check_shape(shape)
            except RLEError as error:
                raise RLEError(f"{_row_name(i, labels)}: {error}") from None
        sizes = heights * widths
        starts = np.zeros(n, dtype=np.int64)
        np.cumsum(sizes[:-1], out=starts[1:])
        stack = np.zeros(int(sizes.sum()), dtype=_UINT8)
    text, bounds = _pack_texts(rles)
    row, result = _decode_rows_kernel(
        text, bounds, stack.reshape(-1), starts, heights, widths, column_major
    )
    if row >= 0:
        h, w = int(heights[row]), int(widths[row])
        try:
            _raise_decode_error(rles[row], result, h * w, _size_words(h, w))
        except RLEError as error:
            raise RLEError(f"{_row_name(row, labels)}: {error}") from None
    if _single_shape(shapes):
        return stack if out is None else out
    return [
        stack[s : s + h * w].reshape(h, w)
        for s, h, w in zip(starts.tolist(), heights.tolist(), widths.tolist(), strict=True)
    ]


def decode_rles_to_labels(
    rles: Sequence[str | float | None],
    shape: tuple[int, int],
    order: RLEOrder,
    *,
    labels: Sequence[str] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Decode the instance RLEs of one image (e.g. DSB nuclei) into a label map, in one numba
    call.

    Args:
        rles: N RLE strings, one per instance; "", None and NaN are empty instances.
        shape: (H, W) of the image.
        order: "C" (row-major) or "F" (column-major) pixel numbering.
        labels: N row names (e.g. image ids) used in error messages.
        out: a caller's zeroed int32 [H, W] C-contiguous buffer to write into.

    Returns:
        [H, W] int32 label map: 0 background, i + 1 where rles[i] is set (`out` when given).

    Raises:
        RLEError: a malformed RLE (naming its row), or two instances sharing a pixel (naming
            both rows and the pixel).
    """
    column_major = _check_order(order)
    height, width = _check_shape(shape)
    rles = list(rles)
    if out is None:
        target = np.zeros((height, width), dtype=np.int32)
    else:
        target = _check_out(out, (height, width), np.dtype(np.int32), "out")
    text, bounds = _pack_texts(rles)
    row, result = _decode_labels_kernel(text, bounds, target, column_major)
    if row >= 0 and result & 7 != _INSTANCE_OVERLAP:
        try:
            _raise_decode_error(rles[row], result, height * width, _size_words(height, width))
        except RLEError as error:
            raise RLEError(f"{_row_name(row, labels)}: {error}") from None
    if row >= 0:
        pixel_row, pixel_col = divmod(result >> 3, width)
        other = int(target[pixel_row, pixel_col]) - 1
        raise RLEError(
            f"{_row_name(row, labels)} overlaps {_row_name(other, labels)} "
            f"at pixel (row {pixel_row}, col {pixel_col}): instances must not overlap"
        )
    return target if out is None else out


def validate_rle(rle: str | float | None, size: int | tuple[int, int]) -> None:
    """Raise RLEError if rle would not decode into an image of `size`: its (H, W), or its
    pixel count H * W (an error then cannot say the image's sides).

    "", None and NaN are valid (empty). Checks everything decode_rle checks, without decoding.
    """
    if isinstance(size, tuple):
        height, width = _check_shape(size)
        n_pixels, words = height * width, _size_words(height, width)
    else:
        n_pixels, words = int(size), "H x W not given"
    result, _ = _scan_kernel(_padded(rle), n_pixels)
    if result != _OK:
        _raise_decode_error(rle, result, n_pixels, words)


def rle_area(rle: str | float | None) -> int:
    """Foreground pixel count of an RLE (sum of lengths) without decoding. Checks the syntax
    and the run order, not the image end (which it does not know)."""
    result, area = _scan_kernel(_padded(rle), _SATURATE)
    if result != _OK:
        _raise_decode_error(rle, result, _SATURATE, "rle_area's limit")
    return area


def warmup() -> None:
    """Compile (or load from numba's cache) every kernel on tiny inputs."""
    mask = np.array([[0, 1, 1], [1, 0, 1]], dtype=np.uint8)
    for order in ("C", "F"):
        rle = encode_rle(mask, order)
        decode_rle(rle, mask.shape, order)
        decode_rle(rle, mask.shape, order, out=np.zeros(mask.shape, np.uint8))
        decode_rles([rle, ""], mask.shape, order)
        decode_rles_to_labels([rle], mask.shape, order)
    rle_area("1 2")
