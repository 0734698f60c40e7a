"""Ring attention over MPI: exact softmax attention over a sequence sharded across ranks.

Each rank keeps its queries; key/value blocks travel around the ring (rank r sends to r+1 and
receives from r-1), so after P steps every query has seen every key. Per step the rank posts the
messages for the next block, runs the blockwise kernel on the block it holds (one call per
(query segment, key segment) pair, pairs that no query sees skipped), merges it into the running
(out, lse) by log-sum-exp, then waits and swaps buffers.

Backward. Buffer planes [K, V, dK, dV]: the K/V planes hold the block computed at this step, the
dK/dV planes the accumulated gradient of the block computed at the previous step, already complete
on this rank. One message per step carries both, so the gradient of a block lags its keys by one
hop and its transfer overlaps the next step's compute; this rank's contribution is computed into a
separate zeroed buffer and added once the accumulator has arrived. After the last step one final
dK/dV hop brings every block's gradient home. dQ stays local.

    ring = Ring(comm, layout="zigzag")
    q, k, v = (ring.shard(x) for x in (q_full, k_full, v_full))
    out, lse = ring.attention_forward(q, k, v, causal=True)
    dq, dk, dv = ring.attention_backward(dout, q, k, v, out, lse, causal=True)
    out_full = ring.unshard(out)

Threads. Calls on one Ring (attention_forward, attention_backward, unshard) are serialised by a lock,
so several threads may share a Ring: each call runs whole, never interleaved with another one's
messages. As with MPI collectives, the n-th call admitted on one rank pairs with the n-th call on every
other rank, so the threads' calls must pair up: a pair that calls different operations or passes
arguments that disagree raises the same error on both ranks; the data itself is the caller's to match.
Independent concurrent work needs one Ring per thread (each has its own duplicated communicator).

Backends. Each call takes its backend from its arrays (ringattn.backends.backend_for: NumPy -> the C++
kernels and host buffers; CuPy -> the CUDA kernels and device buffers, CUDA-aware MPI or pinned
staging), or from Ring(backend=...), which then refuses the other kind. The ring logic below is
written once against the backend contract. Accumulators are be.acc_dtype(dtype): the input dtype on
the CPU, float32 on the GPU (16-bit inputs): the running `out`, dq and the travelling dK/dV are float32
and cast to the input dtype once at the end. Messages are bytes (uint8 views of one buffer per step),
so MPI never infers a type (it has none for bfloat16); the backward's buffer is K/V in the input dtype,
padded to 16 bytes, then dK/dV in the accumulator dtype.

Watchdog. Every point where a rank waits for its peers (the argument agreement, each ring step's
messages, unshard's Allgatherv) runs under ringattn.watchdog.guard: a wait longer than
RINGATTN_WATCHDOG_S (default 600 s) prints which rank, call and step waited and aborts the job.
"""
import contextlib
import threading

import numpy as np

from . import api, backends, watchdog
from . import layout as L
from .mask import Mask, ring_steps
from .backends.dtypes import dtype_name

_ERRORS = {"ValueError": ValueError, "TypeError": TypeError, "NotImplementedError": NotImplementedError}
_ALIGN = 16  # bytes: the gradient planes after K/V start aligned for any accumulator dtype


def _round_up(n, to=_ALIGN):
    return -(-n // to) * to


def _typed(buf, offset, shape, dtype):
    """A typed, shaped view of `nbytes(shape, dtype)` bytes of the uint8 buffer `buf` from `offset`."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return buf[offset:offset + n].view(dtype).reshape(shape)


@contextlib.contextmanager
def _peers(t, src, dst):
    """The transport `t` receiving from `src` and sending to `dst` for one message (its buffers stay:
    a staging device transport mirrors the pool it allocated), then its ring neighbours again."""
    saved = t.src, t.dst
    t.src, t.dst = src, dst
    try:
        yield t
    finally:
        t.src, t.dst = saved


class Ring:
    """Exact ring attention on a communicator (duplicated, so its traffic stays private).

    layout: "zigzag" (default) balances causal work without a window. For windowed calls whose window is
    shorter than a shard use "contiguous": the window already balances the work, and only contiguous
    shards let the ring stop after the steps the window reaches (ringattn.mask.ring_steps; measured in
    docs/performance.md, "Sliding window").

    backend: None (each call's arrays decide: NumPy or device arrays), or "cpu" / "cuda" (the arrays
    must then be of that kind). Thread-safe by serialisation: a lock admits one call at a time on this
    rank (see "Threads" above).
    """

    def __init__(self, comm=None, layout="zigzag", progress=None, backend=None):
        from mpi4py import MPI
        self.layout = L.check_layout(layout)
        if backend is not None and backend not in [b.name for b in backends.BACKENDS]:
            raise ValueError(f"unknown backend {backend!r}: use None (from the arrays), "
                             f"{', '.join(repr(b.name) for b in backends.BACKENDS)}")
        self.backend = backend
        self.comm = (MPI.COMM_WORLD if comm is None else comm).Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.progress = progress
        self._transports = {}  # backend name -> its transport (buffers kept across calls), made on first use
        self.transport = self._transport(backends.cpu)  # the host one, at once (checks `progress`)
        self._lock = threading.Lock()  # one call at a time: the transport's buffers and messages are shared

    def __repr__(self):
        return f"Ring(rank={self.rank}, size={self.size}, layout={self.layout!r})"

    def _transport(self, be):
        t = self._transports.get(be.name)
        if t is None:
            t = self._transports[be.name] = be.make_transport(
                self.comm, L.ring_src(self.rank, self.size), L.ring_dst(self.rank, self.size), progress=self.progress)
        return t

    def _backend_for(self, **arrays):
        """The backend of this call's arrays (a host/device mix is a TypeError), checked against Ring(backend=)."""
        be = backends.backend_for(**arrays)
        if self.backend is not None and be.name != self.backend:
            kind = "device (CuPy)" if be.name == "cuda" else "host (NumPy)"
            raise TypeError(f"this Ring was created with backend={self.backend!r} but {', '.join(arrays)} are "
                            f"{kind} arrays")
        return be

    # ---- layout helpers ------------------------------------------------------------------------
    def segments(self, total, rank=None):
        return L.segments(total, self.size, self.rank if rank is None else rank, self.layout)

    def local_len(self, total):
        return L.local_len(total, self.size, self.rank, self.layout)

    def positions(self, total):
        return L.positions(total, self.size, self.rank, self.layout)

    def shard(self, x_full, axis=1):
        """This rank's part of a full-sequence array along `axis` (a contiguous copy of the same kind:
        NumPy in, NumPy out; device in, device out)."""
        be = backends.backend_for(x_full=x_full)
        x_full = be.asarray(x_full)
        total = x_full.shape[axis]
        parts = []
        for _, n, start, stride in self.segments(total):
            sl = [slice(None)] * x_full.ndim
            sl[axis] = slice(start, start + (n - 1) * stride + 1, stride)
            parts.append(x_full[tuple(sl)])
        return be.ascontiguous(be.xp.concatenate(parts, axis=axis))

    def unshard(self, x_local, axis=1):
        """The full-sequence array on every rank (Allgatherv of the shards), of x_local's kind."""
        with self._lock:
            return self._unshard(x_local, axis)

    def _unshard(self, x_local, axis):
        be = backends.backend_for(x_local=x_local)
        x_local = be.to_host(x_local)  # MPI gathers host bytes; a device result is copied back at the end
        axis = axis % x_local.ndim
        sig = {"array kind": be.name,
               "array": (dtype_name(x_local.dtype), x_local.shape[:axis] + x_local.shape[axis + 1:])}
        lens = self._agree("unshard", sig, None, x_local.shape[axis])
        total = sum(lens)
        self._check_lens("unshard", lens, total)
        moved = np.ascontiguousarray(np.moveaxis(x_local, axis, 0))
        row = moved[0].nbytes if moved.shape[0] else int(np.prod(moved.shape[1:])) * moved.itemsize
        gathered = np.empty((total,) + moved.shape[1:], dtype=moved.dtype)
        counts = [n * row for n in lens]
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        from mpi4py import MPI
        with watchdog.guard("Ring.unshard", "Allgatherv"):
            self.comm.Allgatherv([moved.reshape(-1).view(np.uint8), MPI.BYTE],
                                 [gathered.reshape(-1).view(np.uint8), counts, displs, MPI.BYTE])
        full = np.empty_like(gathered)
        off = 0
        for r, n in enumerate(lens):
            full[L.positions(total, self.size, r, self.layout)] = gathered[off:off + n]
            off += n
        return be.asarray(np.moveaxis(full, 0, axis))
    # ---- per-call agreement across ranks -------------------------------------------------------
    def _agree(self, what, sig, err, local_len):
        """Allgather (operation, signature, local error, local length); raise the same error on every rank.

        The operation comes first: ranks in different calls (one in attention_backward, the others in
        attention_forward) would otherwise pair their messages and hang.
        """
        with watchdog.guard(f"Ring.{what}", "argument agreement"):
            items = self.comm.allgather((what, sig, err, local_len))
        ops = [op for op, _, _, _ in items]
        if any(op != what for op in ops):
            by_op = {}
            for r, op in enumerate(ops):
                by_op.setdefault(op, []).append(r)
            calls = "; ".join(f"ranks {rs} called Ring.{op}" for op, rs in by_op.items())
            raise ValueError(f"ringattn.Ring: ranks are in different calls ({calls}); every rank must make "
                             f"the same sequence of Ring calls")
        items = [item[1:] for item in items]
        for r, (_, e, _) in enumerate(items):
            if e is not None:
                raise _ERRORS.get(e[0], ValueError)(f"ringattn.Ring.{what}: on rank {r}: {e[1]}")
        diffs = []
        for key in sig:
            vals = [s[key] for s, _, _ in items]
            if any(v != vals[0] for v in vals):
                by_val = {}
                for r, v in enumerate(vals):
                    by_val.setdefault(repr(v), []).append(r)
                diffs.append(f"{key}: " + "; ".join(f"ranks {rs} {v}" for v, rs in by_val.items()))
        if diffs:
            raise ValueError(f"ringattn.Ring.{what}: arguments differ across ranks (they must match "
                             f"on every rank except the sequence length): " + " | ".join(diffs))
        return [n for _, _, n in items]

    def _check_lens(self, what, lens, total):
        if total < self.size:
            raise ValueError(f"ringattn.Ring.{what}: total sequence length {total} is shorter than the "
                             f"number of ranks {self.size}")
        want = [L.local_len(total, self.size, r, self.layout) for r in range(self.size)]
        if lens != want:
            raise ValueError(f"ringattn.Ring.{what}: local sequence lengths {lens} do not match the "
                             f"{self.layout!r} layout of the total length {total} over {self.size} ranks "
                             f"(expected {want}); split inputs with ring.shard()")

    def _check(self, what, q, k, v, causal, softmax_scale, window_size, backward=False, dout=None, out=None,
               lse=None):
        """Validate locally, agree across ranks; returns (backend, scale, mask, total length, local lengths).

        The agreement includes the array kind (backend) and dtype, so a rank with NumPy arrays among
        ranks with device arrays is the same error on every rank, not a hang in mismatched messages."""
        sig, err, n, be = {}, None, -1, None
        try:
            named = dict(dout=dout, q=q, k=k, v=v, out=out, lse=lse) if backward else dict(q=q, k=k, v=v)
            be = self._backend_for(**named)
            scale = (api.check_backward_args(dout, q, k, v, out, lse, softmax_scale) if backward
                     else api.check_attention_args(q, k, v, softmax_scale))
            if k.shape[1] != q.shape[1]:
                raise ValueError(f"local q has {q.shape[1]} tokens but k/v have {k.shape[1]}: the ring "
                                 f"shards one sequence, so every rank holds as many keys as queries")
            mask = Mask.of(causal, window_size)
            n = q.shape[1]
            drop_seq = lambda a: tuple(a.shape[:1]) + tuple(a.shape[2:])
            sig = {"array kind": be.name, "dtype": dtype_name(q.dtype), "q shape without seq": drop_seq(q),
                   "k/v shape without seq": drop_seq(k), "causal": bool(causal),
                   "window_size": (mask.window_left, mask.window_right), "softmax_scale": scale,
                   "layout": self.layout}
        except (TypeError, ValueError, NotImplementedError) as e:
            err = (type(e).__name__, str(e))
            sig = {}
        lens = self._agree(what, sig, err, n)
        total = sum(lens)
        self._check_lens(what, lens, total)
        return be, sig["softmax_scale"], Mask.of(causal, window_size), total, lens

    # ---- forward -----------------------------------------------------------------------------------
    def _forward_block(self, be, t, q, k, v, out, lse, q_segs, k_segs, mask, scale):
        for qo, qn, qs, qt in q_segs:
            for ko, kn, ks, kt in k_segs:
                qseg, kseg = (qo, qn, qs, qt), (ko, kn, ks, kt)
                if mask.fully_masked(qseg, kseg):
                    continue  # no query sees any key: skipped, never computed
                causal, *window = mask.pair_mask(qseg, kseg).kernel_args()
                be.forward(q[:, qo:qo + qn], k[:, ko:ko + kn], v[:, ko:ko + kn], out[:, qo:qo + qn],
                           lse[:, :, qo:qo + qn], q_pos=(qs, qt), k_pos=(ks, kt), causal=causal,
                           scale=scale, accumulate=True, window=window)
                t.poll()  # progress between kernel calls where no poller thread may run

    def _wait(self, t, what, step):
        """Complete a ring step's messages; a peer that never sends trips the watchdog."""
        with watchdog.guard(f"Ring.{what}", f"ring step {step + 1} of {self.size}"):
            t.wait()

    def attention_forward(self, q, k, v, causal=False, softmax_scale=None, *, window_size=None):
        """Local shards in, local (out, lse) out; equals full-sequence attention after unshard.

        window_size=(left, right) in global positions (-1 = unbounded; with causal, right = 0): the ring
        runs only the steps whose blocks some rank can see (ringattn.mask.ring_steps)."""
        with self._lock:
            return self._attention_forward(q, k, v, causal, softmax_scale, window_size)

    def _attention_forward(self, q, k, v, causal, softmax_scale, window_size):
        be, scale, mask, total, lens = self._check("attention_forward", q, k, v, causal, softmax_scale, window_size)
        q, k, v = (be.last_axis_contiguous(a) for a in (q, k, v))
        P, r, t = self.size, self.rank, self._transport(be)
        b, n, h, d = q.shape
        hkv = k.shape[2]
        out = be.zeros(q.shape, be.acc_dtype(q.dtype))  # the running output: float32 for 16-bit inputs
        lse = be.xp.full((b, h, n), -np.inf, dtype=be.lse_dtype(q.dtype))
        q_segs = self.segments(total)
        steps = ring_steps(mask, total, P, self.layout)  # blocks move only while some rank needs them
        self.last_steps = steps
        if steps == 1:
            self._forward_block(be, t, q, k, v, out, lse, q_segs, q_segs, mask, scale)
            return out.astype(q.dtype, copy=False), lse
        kv_shape = (2, b, max(lens), hkv, d)  # planes [K, V]
        cur_b, nxt_b = t.alloc((int(np.prod(kv_shape)) * q.dtype.itemsize,), np.uint8)
        cur, nxt = (_typed(x, 0, kv_shape, q.dtype) for x in (cur_b, nxt_b))
        cur[0, :, :n], cur[1, :, :n] = k, v
        for step in range(steps):
            if step < steps - 1:
                # the next block moves while this one is computed; after step 0 it is forwarded as it arrived
                t.start(cur_b, nxt_b, unchanged=0 if step == 0 else cur_b.nbytes)
            owner = L.block_owner(r, P, step)
            nk = lens[owner]
            t.overlap(lambda: self._forward_block(be, t, q, cur[0, :, :nk], cur[1, :, :nk], out, lse, q_segs,
                                                  self.segments(total, owner), mask, scale))
            if step < steps - 1:
                self._wait(t, "attention_forward", step)
            cur, nxt, cur_b, nxt_b = nxt, cur, nxt_b, cur_b
        return out.astype(q.dtype, copy=False), lse

    # ---- backward ----------------------------------------------------------------------------------
    def _backward_block(self, be, t, dout, q, k, v, lse, dlt, dq, dk, dv, q_segs, k_segs, mask, scale):
        for qo, qn, qs, qt in q_segs:
            for ko, kn, ks, kt in k_segs:
                qseg, kseg = (qo, qn, qs, qt), (ko, kn, ks, kt)
                if mask.fully_masked(qseg, kseg):
                    continue
                causal, *window = mask.pair_mask(qseg, kseg).kernel_args()
                q_sl, k_sl = slice(qo, qo + qn), slice(ko, ko + kn)
                be.backward(dout[:, q_sl], q[:, q_sl], k[:, k_sl], v[:, k_sl], lse[:, :, q_sl],
                            dlt[:, :, q_sl], dq[:, q_sl], dk[:, k_sl], dv[:, k_sl], q_pos=(qs, qt),
                            k_pos=(ks, kt), causal=causal, scale=scale, window=window)
                t.poll()

    def attention_backward(self, dout, q, k, v, out, lse, causal=False, softmax_scale=None, *, window_size=None):
        """Gradients (dq, dk, dv) of this rank's shards, from the forward's (out, lse).

        Arguments are checked by ringattn.api.check_backward_args (the same rules as the single-process
        attention_backward), then agreed across ranks."""
        with self._lock:
            return self._attention_backward(dout, q, k, v, out, lse, causal, softmax_scale, window_size)

    def _attention_backward(self, dout, q, k, v, out, lse, causal, softmax_scale, window_size):
        be, scale, mask, total, lens = self._check("attention_backward", q, k, v, causal, softmax_scale, window_size,
                                                   backward=True, dout=dout, out=out, lse=lse)
        dout, q, k, v, out = (be.last_axis_contiguous(a) for a in (dout, q, k, v, out))
        P, r, t = self.size, self.rank, self._transport(be)
        lse = be.ascontiguous(lse)
        b, n, h, d = q.shape
        hkv = k.shape[2]
        acc = be.acc_dtype(q.dtype)  # dq and dK/dV accumulate (and dK/dV travel) in this dtype
        dlt = be.delta(dout, out)
        dq = be.zeros(q.shape, acc)
        q_segs = self.segments(total)
        steps = ring_steps(mask, total, P, self.layout)
        self.last_steps = steps
        if steps == 1:
            dk, dv = be.zeros(k.shape, acc), be.zeros(v.shape, acc)
            self._backward_block(be, t, dout, q, k, v, lse, dlt, dq, dk, dv, q_segs, q_segs, mask, scale)
            return tuple(g.astype(q.dtype, copy=False) for g in (dq, dk, dv))
        planes = (2, b, max(lens), hkv, d)
        kv_bytes = int(np.prod(planes)) * q.dtype.itemsize
        g_off = _round_up(kv_bytes)
        g_bytes = int(np.prod(planes)) * np.dtype(acc).itemsize
        # One byte buffer per direction: [K, V] in the input dtype, then [dK, dV] in the accumulator dtype.
        cur_b, nxt_b = t.alloc((g_off + g_bytes,), np.uint8)
        kv = {id(x): _typed(x, 0, planes, q.dtype) for x in (cur_b, nxt_b)}
        gr = {id(x): _typed(x, g_off, planes, acc) for x in (cur_b, nxt_b)}
        kv[id(cur_b)][0, :, :n], kv[id(cur_b)][1, :, :n] = k, v
        mine = be.empty(planes, acc)  # this rank's contribution at a step
        for step in range(steps):
            owner = L.block_owner(r, P, step)
            # step 0 carries K/V only; the last step only the previous block's gradient.
            part = (slice(0, kv_bytes) if step == 0 else slice(g_off, g_off + g_bytes) if step == steps - 1
                    else slice(0, g_off + g_bytes))
            # K/V after step 0 are forwarded as they arrived; the gradient planes were updated here
            t.start(cur_b[part], nxt_b[part], unchanged=kv_bytes if 0 < step < steps - 1 else 0)
            nk = lens[owner]
            mine.fill(0)
            kc = kv[id(cur_b)]
            t.overlap(lambda: self._backward_block(be, t, dout, q, k if step == 0 else kc[0, :, :nk],
                                                   v if step == 0 else kc[1, :, :nk], lse, dlt, dq,
                                                   mine[0, :, :nk], mine[1, :, :nk], q_segs,
                                                   self.segments(total, owner), mask, scale))
            self._wait(t, "attention_backward", step)
            # nxt now holds the next block's K/V and this block's gradient from the ranks before us.
            g = gr[id(nxt_b)]
            if step == 0:
                g[...] = mine
            else:
                g += mine
            if step == steps - 1:
                # The last block's gradient is complete: one more message takes it home, to its owner
                # (the next rank when the whole ring ran; steps - 1 ranks back when it stopped early).
                grad = slice(g_off, g_off + g_bytes)
                with _peers(t, src=(r + steps - 1) % P, dst=owner), \
                        watchdog.guard("Ring.attention_backward", "final gradient hop"):
                    t.start(nxt_b[grad], cur_b[grad])
                    t.wait()
                home = gr[id(cur_b)]
                return dq.astype(q.dtype, copy=False), home[0, :, :n].astype(k.dtype), home[1, :, :n].astype(v.dtype)
            cur_b, nxt_b = nxt_b, cur_b
