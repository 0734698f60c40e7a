"""PyTorch front end: ring attention as torch autograd ops, CPU and CUDA tensors, zero-copy.

    import ringattn.torch as rt
    out = rt.attention(q, k, v, causal=True)                # one process
    out = rt.ring_attention(q, k, v, ring, causal=True)     # local shards of a ringattn.Ring
    from ringattn.torch import flash_attn_func               # flash-attn's signature

Tensors are in flash-attn's (batch, seq, heads, dim) layout; k and v may have fewer heads (GQA).
Both ops are torch.autograd.Functions: the forward keeps (out, lse) and the backward calls the
backward kernels on them (nothing is recomputed through autograd; not twice differentiable).

How tensors reach the kernels (one place, _bridge_for, decides by the tensors' device):
  - CPU tensors: NumPy views of their memory (`.detach().numpy()`), so the C++ kernels read the
    tensors themselves; results come back as torch.from_numpy views. A tensor whose last axis is not
    contiguous is copied once, by the NumPy API's own rule. float32 and float64 only (as the NumPy
    API; float16/bfloat16 CPU tensors are a TypeError naming the dtype).
  - CUDA tensors: CuPy arrays over the same memory through DLPack, with CuPy's current stream set to
    torch's current stream (cupy.cuda.ExternalStream) for the whole call, so the kernels, the ring's
    copies and the DLPack hand-overs are ordered with the surrounding torch work without a host
    synchronisation. Needs CuPy and a CUDA build of ringattn. Not yet run on a GPU (docs/torch.md).

Importing ringattn never imports this module or torch; importing this module imports torch.
"""
import contextlib

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from . import api, backends, watchdog
from .interop import as_array  # noqa: F401 - re-exported: the plain API's conversion (no torch needed)

__all__ = ["attention", "ring_attention", "flash_attn_func", "shard", "unshard", "positions",
           "allreduce_grads", "as_array"]

NO_WINDOW = (-1, -1)


# ---- arguments -------------------------------------------------------------------------------------
def _torch_dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def check_window(window_size):
    """window_size as (left, right) for the kernels (flash-attn's convention, -1 = unbounded); None or
    (-1, -1) is no window. Its range is checked by ringattn.api (one place) when the kernels run."""
    if window_size is None:
        return None
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise TypeError(f"ringattn.torch: window_size must be a (left, right) pair, got {window_size!r}") from None
    return None if (left, right) == NO_WINDOW else (left, right)


def _check_tensors(named):
    """Every argument a torch tensor; returns the bridge for their device (one device for all)."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ringattn.torch: {name}: expected a torch.Tensor, got {type(t).__name__} "
                            f"(use ringattn.attention_forward for NumPy / CuPy arrays)")
    return _bridge_for(named)


def _bridge_for(named):
    """_HOST for CPU tensors, _DEVICE for CUDA tensors; a mix or another device is a TypeError.

    Reads only `.device` and `.dtype`, so tests can hand it stand-in objects."""
    devices = {name: t.device for name, t in named.items()}
    kinds = {d.type for d in devices.values()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise TypeError(f"ringattn.torch: tensors on different devices ({listed}); move them to one device")
    kind = kinds.pop()
    if kind not in _BRIDGES:
        raise TypeError(f"ringattn.torch: tensors on device {kind!r} are not supported (cpu or cuda)")
    bridge = _BRIDGES[kind]
    for t in named.values():
        bridge.backend().check_dtype(_torch_dtype_name(t.dtype))  # TypeError naming the dtype
    return bridge


# ---- bridges: torch tensors <-> the arrays the kernels take --------------------------------------
class _Host:
    """CPU tensors as NumPy views (no copy) and NumPy results as tensors (no copy)."""
    name = "cpu"

    @staticmethod
    def backend():
        return backends.cpu

    @staticmethod
    def stream(like):
        return contextlib.nullcontext()

    @staticmethod
    def to_array(t):
        return t.detach().numpy()

    @staticmethod
    def to_tensor(a):
        return torch.from_numpy(a)


def _cupy():
    import cupy  # noqa: PLC0415 - optional; only CUDA tensors need it
    return cupy


def _torch_stream_handle(device):
    """The cudaStream_t of torch's current stream on `device` (0: the legacy default stream)."""
    return int(torch.cuda.current_stream(device).cuda_stream)


class _Device:
    """CUDA tensors as CuPy arrays through DLPack (no copy), run on torch's current stream."""
    name = "cuda"

    @staticmethod
    def backend():
        return backends.cuda

    @staticmethod
    @contextlib.contextmanager
    def stream(like):
        """CuPy's current device and stream = `like`'s device and torch's current stream there, so
        ringattn.cuda (which launches on CuPy's current stream) runs in torch's order."""
        try:
            cp = _cupy()
        except ImportError as e:
            raise RuntimeError(f"ringattn.torch: CuPy is required for CUDA tensors ({e}); "
                               "pip install cupy-cuda13x") from None
        index = like.device.index if like.device.index is not None else torch.cuda.current_device()
        with cp.cuda.Device(index), cp.cuda.ExternalStream(_torch_stream_handle(like.device), index):
            yield

    @staticmethod
    def to_array(t):
        # Inside stream(): CuPy's current stream is torch's, so the DLPack exchange needs no wait.
        return _cupy().from_dlpack(t.detach())

    @staticmethod
    def to_tensor(a):
        return torch.from_dlpack(a)


_HOST, _DEVICE = _Host(), _Device()
_BRIDGES = {"cpu": _HOST, "cuda": _DEVICE}


# ---- what runs: one process (ringattn.api) or a ring ------------------------------------------------
class _Local:
    """Single-process attention: ringattn.attention_forward / attention_backward."""

    def checked(self, check):
        return check()

    def forward(self, q, k, v, causal, scale, window):
        return api.attention_forward(q, k, v, causal=causal, softmax_scale=scale, window_size=window)

    def backward(self, dout, q, k, v, out, lse, causal, scale, window):
        return api.attention_backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=scale,
                                      window_size=window)


class _OnRing:
    """Ring attention over local shards: ring.attention_forward / attention_backward (every rank calls)."""

    def __init__(self, ring):
        self.ring = ring

    def checked(self, check):
        """check() on every rank; a rank's refusal is raised on every rank (none is left waiting in the
        ring's messages), naming the first rank that refused."""
        err, result = None, None
        try:
            result = check()
        except (TypeError, ValueError, NotImplementedError) as e:
            err = (type(e).__name__, str(e))
        with watchdog.guard("ringattn.torch.ring_attention", "argument agreement", comm=self.ring.comm):
            errs = self.ring.comm.allgather(err)
        for r, e in enumerate(errs):
            if e is not None:
                cls = {"TypeError": TypeError, "ValueError": ValueError}.get(e[0], NotImplementedError)
                raise cls(f"on rank {r}: {e[1]}")
        return result

    def forward(self, q, k, v, causal, scale, window):
        return self.ring.attention_forward(q, k, v, causal=causal, softmax_scale=scale, window_size=window)

    def backward(self, dout, q, k, v, out, lse, causal, scale, window):
        return self.ring.attention_backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=scale,
                                            window_size=window)


def _run(bridge, fn, tensors, *args):
    """fn on the tensors' arrays, inside the bridge's stream; results back as tensors."""
    with bridge.stream(tensors[0]):
        arrays = [bridge.to_array(t) for t in tensors]
        return tuple(bridge.to_tensor(a) for a in fn(*arrays, *args))


class _AttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, window, runner, bridge):
        out, lse = _run(bridge, runner.forward, (q, k, v), causal, scale, window)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.window, ctx.runner, ctx.bridge = causal, scale, window, runner, bridge
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _run(ctx.bridge, ctx.runner.backward, (dout, q, k, v, out, lse), ctx.causal, ctx.scale,
                          ctx.window)
        return dq, dk, dv, None, None, None, None, None


def _apply(runner, q, k, v, causal, softmax_scale, window_size, return_lse):
    def check():
        window = check_window(window_size)
        bridge = _check_tensors(dict(q=q, k=k, v=v))
        return bridge, None if softmax_scale is None else api.check_scale(softmax_scale, q.shape[-1]), window

    bridge, scale, window = runner.checked(check)  # the rest (shapes, dtypes, window range): api / Ring
    out, lse = _AttentionFn.apply(q, k, v, bool(causal), scale, window, runner, bridge)
    return (out, lse) if return_lse else out


def attention(q, k, v, causal=False, softmax_scale=None, window_size=NO_WINDOW, return_lse=False):
    """Exact softmax attention of torch tensors (batch, seq, heads, dim), differentiable in q, k, v.

    causal: bottom-right aligned (query i sees keys j <= i + seq_k - seq_q), as flash-attn >= 2.1.
    return_lse: also return lse (batch, heads, seq_q), float32 (float64 for float64 CPU inputs),
    natural log of sum_j exp(scale * q.k_j); it carries no gradient.
    """
    return _apply(_Local(), q, k, v, causal, softmax_scale, window_size, return_lse)


def ring_attention(q, k, v, ring, causal=False, softmax_scale=None, window_size=NO_WINDOW, return_lse=False):
    """attention() over a sequence sharded across the ranks of `ring` (a ringattn.Ring).

    q, k, v: this rank's shards (shard() cuts them from full tensors in the ring's layout). Every rank
    must call it, and later run its backward, in the same order (the ring's messages pair up).
    """
    if not (hasattr(ring, "attention_forward") and hasattr(ring, "attention_backward")):
        raise TypeError(f"ringattn.torch.ring_attention: ring: expected a ringattn.Ring, got {type(ring).__name__}")
    return _apply(_OnRing(ring), q, k, v, causal, softmax_scale, window_size, return_lse)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=NO_WINDOW,
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn.flash_attn_func's signature and defaults, on ringattn's kernels (one process).

    Returns out, or (out, softmax_lse, None) with return_attn_probs (no attention probabilities are
    formed). window_size is a sliding window as in flash-attn; non-default dropout_p, softcap,
    alibi_slopes or deterministic raise NotImplementedError naming the argument.
    """
    unsupported = []
    if dropout_p != 0.0:
        unsupported.append(f"dropout_p={dropout_p!r} (no dropout in the kernels; pass 0.0)")
    if softcap != 0.0:
        unsupported.append(f"softcap={softcap!r} (pass 0.0)")
    if alibi_slopes is not None:
        unsupported.append("alibi_slopes (pass None)")
    if deterministic:
        unsupported.append("deterministic=True (with several threads the dq summation order may vary; "
                           "pass False)")
    if unsupported:
        raise NotImplementedError("ringattn.torch.flash_attn_func: not supported: " + "; ".join(unsupported))
    res = attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                    return_lse=return_attn_probs)
    return (res[0], res[1], None) if return_attn_probs else res


# ---- sharding helpers ------------------------------------------------------------------------------
def positions(ring, total, device=None):
    """Global positions (torch.int64) of this rank's tokens of a `total`-long sequence, in local order:
    what RoPE or a position embedding needs for the shard."""
    return torch.from_numpy(ring.positions(int(total))).to(device)


def shard(x, ring, axis=1):
    """This rank's part of the full-sequence tensor x along `axis` (a copy, as Ring.shard).

    Differentiable: the gradient of x holds this rank's shard's gradient at its positions and zeros
    elsewhere (the sum over ranks is the full gradient, as for parameters; see allreduce_grads)."""
    return x.index_select(axis, positions(ring, x.shape[axis], x.device))


def _int_view(t):
    """The same bytes as an integer tensor of the same item size (NumPy has no bfloat16)."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


class _UnshardFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ring, axis):
        ctx.ring, ctx.axis = ring, axis
        host = _int_view(x.detach().cpu()).numpy()
        full = torch.from_numpy(ring.unshard(host, axis=axis)).view(x.dtype)
        return full.to(x.device)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        # Adjoint of the gather under the sum-over-ranks convention: this rank's rows of the sum of
        # every rank's gradient of the full tensor (a reduce-scatter).
        ring, axis = ctx.ring, ctx.axis
        acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
        send = np.ascontiguousarray(grad.detach().to("cpu", acc).numpy())
        total = np.empty_like(send)
        from mpi4py import MPI  # noqa: PLC0415
        with watchdog.guard("ringattn.torch.unshard backward", "Allreduce", comm=ring.comm):
            ring.comm.Allreduce(send, total, op=MPI.SUM)
        mine = torch.from_numpy(total).index_select(axis, positions(ring, grad.shape[axis]))
        return mine.to(grad.device, grad.dtype), None, None


def unshard(x, ring, axis=1):
    """The full-sequence tensor on every rank, from each rank's shard x (Ring.unshard, any dtype).

    Differentiable: the gradient of x is this rank's rows of the sum over ranks of the gradients of
    the full tensor, so a loss computed on every rank counts once per rank, as any per-rank loss.
    Every rank must call it (and its backward) in the same order."""
    axis = axis % x.dim()
    return _UnshardFn.apply(x, ring, axis)


def allreduce_grads(parameters, comm):
    """Sum every parameter's .grad over `comm` (a ringattn.Ring: its communicator; or an mpi4py
    communicator, e.g. COMM_WORLD for data + sequence parallel), in place, one message per dtype.
    The sum runs on host copies (float32 for 16-bit gradients); on GPUs torch's DDP over NCCL
    avoids the host round trip (docs/torch.md).

    A parameter without a gradient on this rank counts as zeros, so every rank sends the same sizes.
    With each rank's loss = (its tokens' summed loss) / (tokens over all ranks), the result is the
    gradient of the whole batch's mean loss on every rank."""
    comm = getattr(comm, "comm", comm)
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype = {}
    for p in params:
        _check_grad_dtype(p.grad.dtype)  # before any message, so a refusal never leaves peers waiting
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    from mpi4py import MPI  # noqa: PLC0415
    for dtype, group in sorted(by_dtype.items(), key=lambda kv: str(kv[0])):  # same order on every rank
        acc = torch.float64 if dtype == torch.float64 else torch.float32  # 16-bit grads are summed in float32
        send = torch.cat([p.grad.detach().reshape(-1).to("cpu", acc) for p in group]).numpy()
        total = np.empty_like(send)
        with watchdog.guard("ringattn.torch.allreduce_grads", "Allreduce", comm=comm):
            comm.Allreduce(send, total, op=MPI.SUM)
        off = 0
        for p in group:
            n = p.numel()
            p.grad.copy_(torch.from_numpy(total[off:off + n]).view(p.shape))
            off += n


def _check_grad_dtype(dtype):
    if not dtype.is_floating_point:
        raise TypeError(f"ringattn.torch.allreduce_grads: gradients of dtype {_torch_dtype_name(dtype)} "
                        f"are not supported (real floating point only)")
