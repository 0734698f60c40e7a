"""The attention mask as one value: causal and a sliding window, in global token positions.

    Mask(causal=False, window_left=-1, window_right=-1)

The query at global position i sees the key at position j iff  i - left <= j <= i + right,  a
negative bound meaning unbounded on that side; causal is right = 0 (flash-attn's convention: causal
with a window keeps the window's left bound). The single-process API places queries bottom-right
(query i at position i + seq_k - seq_q), so its windows align as flash-attn's do.

The kernels implement the same definition in cpp/mask.hpp (shared by the CPU and CUDA kernels);
ringattn.reference has its own naive form (the ground truth). Segments are layout.py's
(local_offset, length, global_start, global_stride).
"""
import numbers
from dataclasses import dataclass
from functools import lru_cache

from . import layout as L


@dataclass(frozen=True)
class Mask:
    causal: bool = False
    window_left: int = -1
    window_right: int = -1

    def __post_init__(self):
        for name in ("window_left", "window_right"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, numbers.Integral):
                raise TypeError(f"window_size: {name} must be an int, got {type(val).__name__} {val!r}")
            if val < -1:
                raise ValueError(f"window_size: {name} must be >= 0, or -1 for unbounded; got {val}")
        object.__setattr__(self, "causal", bool(self.causal))
        object.__setattr__(self, "window_left", int(self.window_left))
        object.__setattr__(self, "window_right", int(self.window_right))

    @classmethod
    def of(cls, causal=False, window_size=None):
        """The mask of an API call: causal and window_size=(left, right) (None or (-1, -1): no window)."""
        if window_size is None:
            return cls(bool(causal))
        if isinstance(window_size, (str, bytes)) or not hasattr(window_size, "__len__") or len(window_size) != 2:
            raise TypeError(f"window_size must be a pair (left, right) of ints (-1 = unbounded), got {window_size!r}")
        return cls(bool(causal), window_size[0], window_size[1])

    @property
    def left(self):
        """Left bound in positions (-1: unbounded)."""
        return self.window_left

    @property
    def right(self):
        """Right bound in positions (-1: unbounded; 0 when causal)."""
        return 0 if self.causal else self.window_right

    @property
    def unmasked(self):
        return self.left < 0 and self.right < 0

    def kernel_args(self):
        """(causal, window_left, window_right) for the kernels' bindings."""
        return False, self.left, self.right

    def visible(self, q_pos, k_pos):
        """Elementwise: the key at k_pos visible to the query at q_pos (NumPy broadcasting works)."""
        ok = True
        if self.left >= 0:
            ok = ok & (k_pos >= q_pos - self.left)
        if self.right >= 0:
            ok = ok & (k_pos <= q_pos + self.right)
        return ok

    # ---- over layout segments (conservative for strided segments: their position range) ------------
    def fully_masked(self, q_seg, k_seg):
        """No query of q_seg sees any key of k_seg: the pair contributes nothing and is skipped."""
        (qa, qb), (ka, kb) = L.seg_range(q_seg), L.seg_range(k_seg)
        return (self.right >= 0 and ka > qb + self.right) or (self.left >= 0 and kb < qa - self.left)

    def fully_visible(self, q_seg, k_seg):
        """Every query of q_seg sees every key of k_seg: the pair needs no mask."""
        (qa, qb), (ka, kb) = L.seg_range(q_seg), L.seg_range(k_seg)
        return (self.right < 0 or kb <= qa + self.right) and (self.left < 0 or ka >= qb - self.left)

    def pair_mask(self, q_seg, k_seg):
        """The mask a kernel call on this segment pair needs: self, or none when fully visible."""
        return Mask() if self.fully_visible(q_seg, k_seg) else self


NONE = Mask()


def step_needed(mask, total, size, rank, layout, step):
    """Whether `rank` sees any key of the block it holds at ring step `step` (the same answer on every rank)."""
    owner = L.block_owner(rank, size, step)
    k_segs = L.segments(total, size, owner, layout)
    return any(not mask.fully_masked(q, k) for q in L.segments(total, size, rank, layout) for k in k_segs)


@lru_cache(maxsize=256)
def ring_steps(mask, total, size, layout):
    """Ring steps every rank runs: 1 + the last step any rank needs (step 0, its own block, always runs).

    Computed the same way on every rank, so the messages still pair: blocks move only while some rank
    further round the ring still needs them. A window that reaches back fewer tokens than a shard
    with the contiguous layout needs 2 steps (own block and the previous rank's) instead of P."""
    last = 0
    for r in range(size):
        for s in range(size - 1, last, -1):
            if step_needed(mask, total, size, r, layout, s):
                last = s
                break
    return last + 1
