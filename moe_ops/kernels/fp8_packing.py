"""fp8 e4m3 codes stored transposed, four codes a 32-bit word.

The FP8 casts that write a transposed layout (W^T's block codes, the wgrad operands' token
blocks) read their input with the contiguous dim across threads and write codes whose
contiguous dim is the input's *row* dim. Stored one byte an element, that transpose costs one
shared-memory byte store an element (``STS.U8``) inside the layout conversion Triton inserts.
Here a tile's rows are read as four interleaved parts (rows ``4i + j``, part ``j``), each in the
same register layout, so the codes of rows ``4i .. 4i + 3`` of a column meet in one thread and
pack into one little-endian word (byte ``j``: row ``4i + j``) with no data movement; the
transpose then moves words. Needs the output's rows (the input's row dim) 4-byte aligned and a
multiple of 4 long where a word is stored.

The helpers compute values and offsets only; the kernels store (Inductor's mutation analysis
counts every argument of a helper that stores as written, inputs included: see
``tests/test_kernel_writes.py``).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def quad_offsets(rows0, cols, stride_r, stride_c, QUADS: tl.constexpr):
    """int64 ``[QUADS, len(cols)]`` offsets of rows ``rows0 + 4 i`` (part 0; part ``j`` is
    ``+ j * stride_r``) and columns ``cols``, and the rows ``rows0 + 4 i``."""
    r = rows0 + 4 * tl.arange(0, QUADS)
    return r.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c, r


@triton.jit
def load_quads_stored(base, rows0, row_end, cols, c_mask, stride_r, stride_c, QUADS: tl.constexpr):
    """:func:`load_quads` in the operand's own dtype (not converted: a load kept in flight
    while other work runs, converted where it is used)."""
    off, r = quad_offsets(rows0, cols, stride_r, stride_c, QUADS)
    ptr = base + off
    v0 = tl.load(ptr, mask=(r < row_end)[:, None] & c_mask[None, :], other=0.0)
    v1 = tl.load(ptr + stride_r, mask=(r + 1 < row_end)[:, None] & c_mask[None, :], other=0.0)
    v2 = tl.load(ptr + 2 * stride_r, mask=(r + 2 < row_end)[:, None] & c_mask[None, :], other=0.0)
    v3 = tl.load(ptr + 3 * stride_r, mask=(r + 3 < row_end)[:, None] & c_mask[None, :], other=0.0)
    return v0, v1, v2, v3


@triton.jit
def load_quads(base, rows0, row_end, cols, c_mask, stride_r, stride_c, QUADS: tl.constexpr):
    """Rows ``rows0 + 4 i + j`` (``i < QUADS``) and columns ``cols`` of a 2-D operand at
    ``base`` (strides ``stride_r``, ``stride_c``) as four ``[QUADS, len(cols)]`` tiles
    (``j = 0..3``) in float32, zeros at rows ``>= row_end`` and masked columns."""
    v0, v1, v2, v3 = load_quads_stored(base, rows0, row_end, cols, c_mask, stride_r, stride_c, QUADS)
    return v0.to(tl.float32), v1.to(tl.float32), v2.to(tl.float32), v3.to(tl.float32)


@triton.jit
def quads_abs(v0, v1, v2, v3):
    """Elementwise ``max |v_j|`` of the four parts."""
    return tl.maximum(tl.maximum(tl.abs(v0), tl.abs(v1)), tl.maximum(tl.abs(v2), tl.abs(v3)))


@triton.jit
def _byte(code):
    return code.to(tl.uint8, bitcast=True).to(tl.uint32)


@triton.jit
def pack_codes(c0, c1, c2, c3):
    """Four float8 e4m3 code tiles (parts 0-3 of :func:`load_quads`) as ``uint32`` words, byte
    ``j`` holding part ``j``'s code (rows ``4i + j`` at consecutive bytes in memory)."""
    return _byte(c0) | (_byte(c1) << 8) | (_byte(c2) << 16) | (_byte(c3) << 24)


@triton.jit
def word_offsets(word_row0, word_end, cols, c_mask, stride_qc, QUADS: tl.constexpr):
    """``(offsets, mask)`` ``[QUADS, len(cols)]`` of words in a float8 tensor viewed as 32-bit
    words (``q_ptr.to(tl.pointer_type(tl.uint32))``): word ``(i, c)`` at column ``cols[c]``
    (byte stride ``stride_qc``, a multiple of 4), word ``word_row0 + i`` of that row (bytes
    ``4 (word_row0 + i) .. + 3``), masked where that is ``>= word_end``."""
    i = word_row0 + tl.arange(0, QUADS)
    off = cols.to(tl.int64)[None, :] * (stride_qc // 4) + i.to(tl.int64)[:, None]
    return off, (i < word_end)[:, None] & c_mask[None, :]
