"""Layouts as pure functions: every token on exactly one rank, balanced sizes, correct segments."""
import numpy as np
import pytest

from ringattn import layout as L
from ringattn.mask import Mask

CASES = [(P, S) for P in (1, 2, 3, 4, 5, 8) for S in sorted({P, P + 1, 2 * P - 1, 2 * P, 2 * P + 1, 97, 1025})
         if S >= P]


@pytest.mark.parametrize("layout", L.LAYOUTS)
@pytest.mark.parametrize("P,S", CASES)
def test_partition(layout, P, S):
    pos = [L.positions(S, P, r, layout) for r in range(P)]
    allpos = np.concatenate(pos)
    assert np.array_equal(np.sort(allpos), np.arange(S))  # every token exactly once
    lens = [L.local_len(S, P, r, layout) for r in range(P)]
    assert lens == [len(p) for p in pos]
    assert min(lens) >= 1
    assert max(lens) - min(lens) <= (2 if layout == "zigzag" else 1)
    for r in range(P):
        segs = L.segments(S, P, r, layout)
        expect_off = 0
        for off, n, start, stride in segs:
            assert off == expect_off and n >= 1
            assert np.array_equal(pos[r][off:off + n], start + stride * np.arange(n))
            expect_off += n
        assert expect_off == lens[r]


def test_layout_definitions():
    # contiguous: consecutive chunks, larger ones first
    assert [list(L.positions(10, 3, r, "contiguous")) for r in range(3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    # zigzag: 2P chunks, rank r holds chunks r and 2P-1-r
    assert [list(L.positions(8, 2, r, "zigzag")) for r in range(2)] == [[0, 1, 6, 7], [2, 3, 4, 5]]
    assert [list(L.positions(9, 2, r, "zigzag")) for r in range(2)] == [[0, 1, 2, 7, 8], [3, 4, 5, 6]]
    # striped: token t on rank t mod P
    assert [list(L.positions(7, 3, r, "striped")) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert L.segments(7, 3, 1, "striped") == [(0, 2, 1, 3)]


def test_zigzag_short_sequence_drops_empty_chunks():
    # S = P: only chunks 0..P-1 are non-empty, each rank still holds one token
    assert [L.segments(3, 3, r, "zigzag") for r in range(3)] == [[(0, 1, 0, 1)], [(0, 1, 1, 1)], [(0, 1, 2, 1)]]


def test_ring_neighbours_and_owner():
    for P in (1, 2, 3, 5):
        for r in range(P):
            assert L.ring_dst(L.ring_src(r, P), P) == r
            assert L.block_owner(r, P, 0) == r
            # over P steps a rank sees every block once
            assert sorted(L.block_owner(r, P, s) for s in range(P)) == list(range(P))
            # what I hold at step s+1 is what my source held at step s
            for s in range(P - 1):
                assert L.block_owner(r, P, s + 1) == L.block_owner(L.ring_src(r, P), P, s)


def test_mask_predicates():
    causal = Mask(causal=True)
    q = (0, 4, 8, 1)  # positions 8..11
    assert causal.fully_masked(q, (0, 3, 12, 1))
    assert not causal.fully_masked(q, (0, 3, 11, 1))
    assert causal.fully_visible(q, (0, 9, 0, 1))
    assert not causal.fully_visible(q, (0, 10, 0, 1))
    assert causal.fully_visible((0, 3, 6, 2), (0, 2, 2, 3))  # strided: keys {2, 5} <= queries {6, 8, 10}
    assert Mask().fully_visible(q, (0, 3, 100, 1)) and not Mask().fully_masked(q, (0, 3, 100, 1))
    win = Mask(causal=True, window_left=2)  # query p sees p-2 .. p
    assert win.fully_masked(q, (0, 3, 3, 1))  # keys 3..5 < 8 - 2
    assert not win.fully_masked(q, (0, 3, 4, 1))  # key 6 = 8 - 2
    assert win.fully_visible((0, 3, 9, 1), (0, 1, 9, 1)) and not win.fully_visible((0, 3, 9, 1), (0, 2, 8, 1))
    two_sided = Mask(window_left=1, window_right=3)
    assert two_sided.fully_masked(q, (0, 2, 15, 1)) and not two_sided.fully_masked(q, (0, 2, 14, 1))


def test_mask_predicates_agree_with_the_definition():
    """fully_masked / fully_visible against every (query, key) pair of random segments and windows."""
    rng = np.random.default_rng()
    for _ in range(300):
        m = Mask(bool(rng.integers(2)), int(rng.integers(-1, 6)), int(rng.integers(-1, 6)))
        q = (0, int(rng.integers(1, 5)), int(rng.integers(0, 20)), int(rng.integers(1, 4)))
        k = (0, int(rng.integers(1, 5)), int(rng.integers(0, 20)), int(rng.integers(1, 4)))
        qp = q[2] + q[3] * np.arange(q[1])
        kp = k[2] + k[3] * np.arange(k[1])
        vis = m.visible(qp[:, None], kp[None, :]) & np.ones((q[1], k[1]), bool)
        if m.fully_masked(q, k):
            assert not vis.any(), (m, q, k)
        if m.fully_visible(q, k):
            assert vis.all(), (m, q, k)
        if q[3] == k[3] == 1:  # contiguous segments: the predicates are exact
            assert m.fully_masked(q, k) == (not vis.any()) and m.fully_visible(q, k) == vis.all(), (m, q, k)


@pytest.mark.parametrize("P", [1, 3, 4])
def test_zigzag_balances_causal_work(P):
    # count visible (q, k) pairs per rank: zigzag/striped within a few percent, contiguous far apart
    S = 64 * P
    def work(layout):
        out = []
        for r in range(P):
            qp = L.positions(S, P, r, layout)
            out.append(sum(int((np.arange(S) <= p).sum()) for p in qp))
        return out
    for layout in ("zigzag", "striped"):
        w = work(layout)
        assert max(w) <= 1.05 * min(w)
    if P > 1:
        w = work("contiguous")
        assert max(w) > 2 * min(w)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown layout"):
        L.segments(8, 2, 0, "diagonal")
    with pytest.raises(ValueError, match="shorter than the number of ranks"):
        L.segments(3, 4, 0, "zigzag")
