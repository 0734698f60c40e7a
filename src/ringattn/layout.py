"""Sequence layouts: which global tokens each rank holds, as tiny pure functions.

A rank's shard is a list of segments (local_offset, length, global_start, global_stride): local rows
local_offset .. local_offset+length-1 hold global tokens global_start + i * global_stride. Segments
are what the kernels take as position descriptors, so one kernel call per (q segment, k segment)
pair serves every layout.

  contiguous  rank r holds the r-th of P consecutive chunks                  (1 segment)
  zigzag      2P chunks; rank r holds chunks r and 2P-1-r (balances causal)  (2 segments)
  striped     token t lives on rank t mod P (balances causal)              (1 strided segment)

Any total length S >= P works: chunk sizes differ by at most one token (the first S mod n chunks
get the extra token), so every rank holds at least one token.
"""
import numpy as np

LAYOUTS = ("contiguous", "zigzag", "striped")


def check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    return layout


def chunk_size(total, n, c):
    """Size of chunk c of n (O(1): the ring checks every rank's length on every call)."""
    base, extra = divmod(total, n)
    return base + (1 if c < extra else 0)


def chunk_start(total, n, c):
    """Global index of the first token of chunk c (of n)."""
    base, extra = divmod(total, n)
    return c * base + min(c, extra)


def segments(total, size, rank, layout):
    """This rank's segments [(local_offset, length, global_start, global_stride)], empty ones dropped."""
    check_layout(layout)
    if total < size:
        raise ValueError(f"total sequence length {total} is shorter than the number of ranks {size}")
    if layout == "contiguous":
        return [(0, chunk_size(total, size, rank), chunk_start(total, size, rank), 1)]
    if layout == "striped":
        return [(0, len(range(rank, total, size)), rank, size)]
    segs, off = [], 0
    for c in (rank, 2 * size - 1 - rank):
        n = chunk_size(total, 2 * size, c)
        if n:
            segs.append((off, n, chunk_start(total, 2 * size, c), 1))
            off += n
    return segs


def local_len(total, size, rank, layout):
    """Number of tokens rank holds."""
    return sum(seg[1] for seg in segments(total, size, rank, layout))


def positions(total, size, rank, layout):
    """Global positions (int64) of this rank's tokens, in local order."""
    parts = [start + stride * np.arange(n, dtype=np.int64) for _, n, start, stride in segments(total, size, rank, layout)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def seg_range(seg):
    """(first, last) global position of a segment (which pairs a mask hides: ringattn.mask.Mask)."""
    _, n, start, stride = seg
    return start, start + (n - 1) * stride


def ring_src(rank, size):
    """Rank we receive K/V from."""
    return (rank - 1) % size


def ring_dst(rank, size):
    """Rank we send K/V to."""
    return (rank + 1) % size


def block_owner(rank, size, step):
    """Rank whose K/V block this rank holds at ring step `step` (step 0: its own)."""
    return (rank - step) % size
