"""A test-only emulated CUDA device: the part of CuPy ringattn uses, over host memory, plus the
CUDA kernels from cuda/ built as C++ (-DRA_EMULATE). Selected only by calling install().

    import emu_device as emu
    emu.install()              # backends.cuda now runs on the emulated device
    a = emu.xp.asarray(host)   # an EmuArray; emu.xp stands in for `cupy`
    emu.uninstall()

What it models, and why:
- EmuArray: a device array whose memory is host memory. It exposes __cuda_array_interface__ (v3,
  the host pointer, the current stream) and .get() / .data.ptr like cupy.ndarray, and it REFUSES
  what CuPy refuses, so a host/device mix-up in the package fails here as on a GPU: NumPy arrays in
  its ufuncs, operators, indices and np.* functions (TypeError), and implicit conversion
  (np.asarray(emu) raises, so the C++ CPU kernels cannot silently take one). It is deliberately not
  an ndarray subclass: a subclass would pass np.asarray and the pybind11 CPU kernels unnoticed.
- Execution is synchronous: every copy and kernel runs when it is issued. Ordering is checked
  instead of being emulated: each stream, and the host, carries a vector clock; an event captures a
  stream's clock, wait_event / synchronize / a polled-done event merge clocks (happens-before).
  Every access to device or pinned memory (kernels, copies, EmuArray operations, .get(), and the
  MPI calls a test reports with host_reads / host_writes) is checked against earlier conflicting
  accesses of the same bytes: if one of them is not ordered before it (a missing event wait or
  synchronize), HazardError names both. A freshly recorded event reports done only after being
  polled once, so code that polls `done` really loops.
- Pinned memory (cuda.alloc_pinned_memory) is host memory poisoned with 0xFF bytes, as is
  xp.empty (0xFF is NaN in every float type); memcpyAsync checks its `kind` against which side is
  device memory and copies with ctypes.memmove.
"""
import bisect
import collections
import ctypes
import itertools
import threading
import types
import weakref

import ml_dtypes
import numpy as np

bfloat16 = np.dtype(ml_dtypes.bfloat16)
POISON = 0xFF  # NaN in float16/bfloat16/float32/float64, -1 in signed ints
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "bool": 1}


class HazardError(AssertionError):
    """Two accesses to the same bytes, at least one a write, with no ordering between them."""


# ---- ordering: streams, events and the host as vector clocks ---------------------------------------
class _Actor:
    """A stream or the host: its vector clock {actor key: operations of that actor it has seen}."""

    def __init__(self, key, label):
        self.key, self.label, self.clock = key, label, {}

    def merge(self, clock):
        for k, n in clock.items():
            if self.clock.get(k, 0) < n:
                self.clock[k] = n

    def sees(self, stamp):
        return self.clock.get(stamp[0], 0) >= stamp[1]


class _Region:
    """One live allocation (device or pinned) and the accesses still relevant to it."""

    def __init__(self, lo, hi, kind):
        self.lo, self.hi, self.kind = lo, hi, kind
        self.accesses = []  # (lo, hi, write, stamp, actor label, what)


class Timeline:
    """Clocks of the host and every stream, the live memory regions, and a log of issued work."""

    def __init__(self):
        self.lock = threading.RLock()  # the transport's progress thread may poll events
        self.host = _Actor("host", "host")
        self.streams = {}
        self._los, self._regions, self._by_root = [], {}, {}
        self.log = collections.deque(maxlen=100_000)  # (actor label, what) of recent operations, for tests

    # regions
    def add_region(self, owner, lo, nbytes, kind):
        """Track [lo, lo + nbytes) while `owner` lives (its memory is not reused before that)."""
        if nbytes == 0:
            return
        with self.lock:
            self._regions[lo] = _Region(lo, lo + nbytes, kind)
            bisect.insort(self._los, lo)
            self._by_root[id(owner)] = lo
        weakref.finalize(owner, self._drop, lo, id(owner))

    def _drop(self, lo, root_id):
        with self.lock:
            self._regions.pop(lo, None)
            self._by_root.pop(root_id, None)
            i = bisect.bisect_left(self._los, lo)
            if i < len(self._los) and self._los[i] == lo:
                del self._los[i]

    def knows_root(self, root):
        return id(root) in self._by_root

    def region_at(self, lo, hi):
        """The live region containing [lo, hi), or None (memory the emulator does not own)."""
        with self.lock:
            i = bisect.bisect_right(self._los, lo) - 1
            if i >= 0:
                r = self._regions[self._los[i]]
                if lo >= r.lo and hi <= r.hi:
                    return r
        return None

    # ordering
    def stream(self, ptr):
        s = self.streams.get(int(ptr) if int(ptr) != 1 else 0)
        if s is None:
            raise ValueError(f"emulated device: unknown stream handle {ptr:#x}")
        return s

    def op(self, actor, what, reads=(), writes=()):
        """Issue one operation on `actor` touching byte ranges; raise HazardError on a race."""
        with self.lock:
            if actor is not self.host:
                actor.merge(self.host.clock)  # the host issued it after everything it has seen
            n = actor.clock.get(actor.key, 0) + 1
            actor.clock[actor.key] = n
            stamp = (actor.key, n)
            self.log.append((actor.label, what))
            for rng, write in [(r, False) for r in reads] + [(w, True) for w in writes]:
                self._access(actor, stamp, rng, write, what)

    def _access(self, actor, stamp, rng, write, what):
        lo, hi = rng
        if hi <= lo:
            return
        region = self.region_at(lo, hi)
        if region is None:
            return
        keep = []
        for a in region.accesses:
            alo, ahi, awrite, astamp, alabel, awhat = a
            overlaps = alo < hi and lo < ahi
            if overlaps and (write or awrite) and not actor.sees(astamp):
                kinds = ("writes" if write else "reads", "write" if awrite else "read")
                raise HazardError(
                    f"emulated device: {what} on {actor.label} {kinds[0]} {region.kind} bytes "
                    f"[{lo - region.lo}, {hi - region.lo}) while the {kinds[1]} by {awhat} on {alabel} "
                    f"is not ordered before it (missing event wait or synchronize)")
            covered = lo <= alo and ahi <= hi and (write or (not awrite and alabel == actor.label))
            if not covered:
                keep.append(a)
        keep.append((lo, hi, write, stamp, actor.label, what))
        region.accesses = keep

    def host_sees(self, clock, what):
        with self.lock:
            self.host.merge(clock)
            self.log.append(("host", what))


timeline = Timeline()


def _span(h):
    """Byte range [lo, hi) a host ndarray view covers (the whole extent for strided views)."""
    if h.size == 0:
        return (0, 0)
    ptr = h.__array_interface__["data"][0]
    lo = ptr + sum((n - 1) * s for n, s in zip(h.shape, h.strides) if s < 0)
    hi = ptr + sum((n - 1) * s for n, s in zip(h.shape, h.strides) if s > 0) + h.itemsize
    return (lo, hi)


def _desc_span(d):
    """Byte range of a kernel-binding descriptor (ptr, shape, strides, dtype name, readonly)."""
    ptr, shape, strides, dtype = d[0], d[1], d[2], d[3]
    if 0 in shape:
        return (0, 0)
    lo = ptr + sum((n - 1) * s for n, s in zip(shape, strides) if s < 0)
    return (lo, ptr + sum((n - 1) * s for n, s in zip(shape, strides) if s > 0) + _ITEMSIZE.get(dtype, 1))


# ---- streams and events (the cupy.cuda subset) ------------------------------------------------------
class Event:
    """cupy.cuda.Event: captures a stream's clock when recorded."""
    polls_before_done = 1  # a just-recorded event reads "not done" this many times

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.clock, self._polls = None, 0

    def record(self, stream=None):
        stream = stream or get_current_stream()
        with timeline.lock:
            self.clock = dict(stream.clock)
        self._polls = self.polls_before_done

    @property
    def done(self):
        if self.clock is None:
            return True
        if self._polls > 0:
            self._polls -= 1
            return False
        timeline.host_sees(self.clock, "event.done")
        return True

    def synchronize(self):
        if self.clock is not None:
            timeline.host_sees(self.clock, "event.synchronize")


class Stream:
    """cupy.cuda.Stream: a handle (.ptr), record / wait_event / synchronize, `with stream:`."""
    _handles = itertools.count(0x5000, 0x10)

    def __init__(self, null=False, non_blocking=False, ptds=False):
        self.ptr = 0 if null else next(self._handles)
        self._actor = _Actor(self.ptr, "null stream" if null else f"stream {self.ptr:#x}")
        timeline.streams[self.ptr] = self

    @property
    def clock(self):
        return self._actor.clock

    def record(self, event=None):
        event = event or Event()
        event.record(self)
        return event

    def wait_event(self, event):
        if event.clock is not None:
            with timeline.lock:
                self._actor.merge(event.clock)

    def synchronize(self):
        timeline.host_sees(dict(self.clock), f"synchronize {self._actor.label}")

    @property
    def done(self):
        self.synchronize()  # synchronous execution: all issued work is finished
        return True

    def use(self):
        _current[-1] = self
        return self

    def __enter__(self):
        _current.append(self)
        return self

    def __exit__(self, *exc):
        _current.pop()


NULL_STREAM = Stream(null=True)
Stream.null = NULL_STREAM
_current = [NULL_STREAM]


def get_current_stream():
    return _current[-1]


def _actor_of(stream_ptr):
    return timeline.stream(stream_ptr)._actor


def _touch(what, reads=(), writes=()):
    """An operation on the current stream reading / writing EmuArrays."""
    timeline.op(get_current_stream()._actor, what, [_span(a._h) for a in reads], [_span(a._h) for a in writes])


def host_reads(buf, what):
    """Report that the host (e.g. MPI_Isend) reads `buf` (an EmuArray or host ndarray) now."""
    h = buf._h if isinstance(buf, EmuArray) else buf
    timeline.op(timeline.host, what, reads=[_span(h)])


def host_writes(buf, what):
    """Report that the host (e.g. MPI_Irecv) writes `buf` now."""
    h = buf._h if isinstance(buf, EmuArray) else buf
    timeline.op(timeline.host, what, writes=[_span(h)])


# ---- the device array ----------------------------------------------------------------------------
def _root(h):
    while isinstance(h.base, np.ndarray):
        h = h.base
    return h


def _refuse_host(where):
    raise TypeError(f"{where}: a NumPy (host) array was mixed with device arrays (CuPy refuses this: "
                    "move it with cupy.asarray() or .get())")


def _unwrap(x, where, seen):
    """Host views of EmuArrays (collected in `seen`), refusing NumPy arrays, through lists/tuples."""
    if isinstance(x, EmuArray):
        seen.append(x)
        return x._h
    if isinstance(x, np.ndarray):
        _refuse_host(where)
    if type(x) in (list, tuple):
        return type(x)(_unwrap(i, where, seen) for i in x)
    return x


def _wrap(r):
    """EmuArrays for ndarray results (NumPy scalars become 0-d device arrays, as in CuPy)."""
    if isinstance(r, np.ndarray):
        return EmuArray(r)
    if isinstance(r, np.generic):
        return EmuArray(np.asarray(r))
    if type(r) in (list, tuple):
        return type(r)(_wrap(i) for i in r)
    return r


def _arrays(r):
    if isinstance(r, EmuArray):
        return [r]
    if type(r) in (list, tuple):
        return [a for i in r for a in _arrays(i)]
    return []


def _call(fn, args, kwargs, what, self_=None):
    """fn on host views; results wrapped; the call is an operation on the current stream that reads
    its EmuArray arguments and writes the results that are new memory (views are no access)."""
    reads = [] if self_ is None else [self_]
    out = kwargs.get("out")
    a = _unwrap(args, what, reads)
    k = {key: _unwrap(v, what, reads) for key, v in kwargs.items()}
    r = fn(*a, **k)
    in_roots = {id(_root(x._h)) for x in reads}
    if out is not None:
        res = out
        writes = _arrays(out)
    elif r is None and self_ is not None:  # an in-place method (fill, sort, ...)
        res, writes = None, [self_]
    else:
        res = _wrap(r)
        writes = [x for x in _arrays(res) if id(_root(x._h)) not in in_roots]
        if _arrays(res) and not writes:  # only views of the arguments: no memory is touched
            return res
    _touch(what, [x for x in reads if not any(x is w for w in writes)], writes)
    return res


class _MemoryPointer:
    def __init__(self, ptr):
        self.ptr = ptr


class EmuArray:
    """cupy.ndarray over host memory (see the module docstring for what it refuses and tracks)."""

    __slots__ = ("_h", "__weakref__")
    __hash__ = None

    def __init__(self, host):
        self._h = host
        root = _root(host)
        if not timeline.knows_root(root):
            timeline.add_region(root, _span(root)[0], root.nbytes, "device")

    # what CuPy exposes directly
    @property
    def __cuda_array_interface__(self):
        h = self._h
        stream = get_current_stream().ptr
        return {"shape": h.shape, "typestr": h.dtype.str, "descr": h.dtype.descr,
                "data": (h.__array_interface__["data"][0], False),
                "strides": None if h.flags.c_contiguous else h.strides, "version": 3,
                "stream": 1 if stream == 0 else stream}

    @property
    def data(self):
        return _MemoryPointer(self._h.__array_interface__["data"][0])

    def get(self, stream=None, order="C", out=None, blocking=True):
        """A host NumPy copy (a copy on the current stream, then the host waits for it)."""
        _touch("ndarray.get", reads=[self])
        get_current_stream().synchronize()
        if out is None:
            return np.array(self._h, copy=True, order=order)
        if not isinstance(out, np.ndarray) or out.shape != self._h.shape or out.dtype != self._h.dtype:
            raise ValueError("get(out=...): out must be a NumPy array of the same shape and dtype")
        timeline.op(timeline.host, "ndarray.get into out", writes=[_span(out)])
        np.copyto(out, self._h)
        return out

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct "
                        "a NumPy array explicitly. (emulated device)")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        what = f"{ufunc.__name__}.{method}" if method != "__call__" else ufunc.__name__
        if method == "at":  # ufunc.at(a, idx, b) updates `a` in place
            _call(getattr(ufunc, method), inputs, kwargs, what)
            _touch(what, writes=[inputs[0]])
            return None
        if isinstance(kwargs.get("out"), tuple) and len(kwargs["out"]) == 1:
            kwargs["out"] = kwargs["out"][0]
        return _call(getattr(ufunc, method), inputs, kwargs, what)

    def __array_function__(self, func, types_, args, kwargs):
        return _call(func, args, kwargs, f"np.{func.__name__}")

    def __getattr__(self, name):
        if name.startswith("__"):  # no __array_interface__, __dlpack__ ...: host views stay hidden
            raise AttributeError(f"EmuArray has no attribute {name!r}")
        attr = getattr(self._h, name)
        if callable(attr):
            return lambda *a, **k: _call(attr, a, k, f"ndarray.{name}", self_=self)
        return _wrap(attr) if isinstance(attr, np.ndarray) else attr

    # indexing: views are free; fancy indexing copies
    def __getitem__(self, idx):
        seen = []
        r = self._h[_unwrap(idx, "indexing", seen)]
        res = _wrap(r)
        if isinstance(r, np.ndarray) and _root(r) is _root(self._h):
            return res
        _touch("getitem", reads=[self, *seen], writes=[res])
        return res

    def __setitem__(self, idx, value):
        seen = []
        key = _unwrap(idx, "indexing", seen)
        vals = []
        v = _unwrap(value, "setitem", vals)
        target = self._h[key]
        dst = EmuArray(target) if isinstance(target, np.ndarray) and _root(target) is _root(self._h) else self
        self._h[key] = v
        _touch("setitem", reads=[*seen, *vals], writes=[dst])

    # scalars and iteration read device memory from the host (CuPy synchronises)
    def _host_scalar(self):
        return self.get()

    def __bool__(self):
        return bool(self._host_scalar())

    def __float__(self):
        return float(self._host_scalar())

    def __int__(self):
        return int(self._host_scalar())

    def __index__(self):
        return self._host_scalar().__index__()

    def __len__(self):
        return len(self._h)

    def __iter__(self):
        return (self[i] for i in range(len(self._h)))

    def __repr__(self):
        return f"EmuArray({np.array2string(self._h, threshold=20)}, dtype={self._h.dtype})"


def _install_operators():
    binary = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "truediv": np.true_divide,
              "floordiv": np.floor_divide, "mod": np.remainder, "pow": np.power, "matmul": np.matmul,
              "and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor,
              "lshift": np.left_shift, "rshift": np.right_shift}
    for n, uf in binary.items():
        setattr(EmuArray, f"__{n}__", lambda self, o, uf=uf: uf(self, o))
        setattr(EmuArray, f"__r{n}__", lambda self, o, uf=uf: uf(o, self))
        setattr(EmuArray, f"__i{n}__", lambda self, o, uf=uf: uf(self, o, out=(self,)))
    for n, uf in {"lt": np.less, "le": np.less_equal, "eq": np.equal, "ne": np.not_equal,
                  "gt": np.greater, "ge": np.greater_equal}.items():
        setattr(EmuArray, f"__{n}__", lambda self, o, uf=uf: uf(self, o))
    for n, uf in {"neg": np.negative, "pos": np.positive, "abs": np.absolute, "invert": np.invert}.items():
        setattr(EmuArray, f"__{n}__", lambda self, uf=uf: uf(self))


_install_operators()


# ---- the `cupy` stand-in -------------------------------------------------------------------------
def _poisoned(shape, dtype):
    dtype = np.dtype(dtype)
    shape = (shape,) if np.isscalar(shape) else tuple(shape)
    raw = np.full(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, POISON, np.uint8)
    return raw.view(dtype).reshape(shape)


def alloc_pinned_memory(nbytes):
    """Pinned host memory: a poisoned host buffer (buffer protocol, like cupy's PinnedMemoryPointer)."""
    mem = np.full(int(nbytes), POISON, np.uint8)
    timeline.add_region(mem, _span(mem)[0], mem.nbytes, "pinned")
    return mem


MEMCPY_KINDS = {1: ("host", "device"), 2: ("device", "host"), 3: ("device", "device"), 4: (None, None)}


def memcpy_async(dst, src, size, kind, stream):
    """cudaMemcpyAsync over host memory: the kind must match which side is device memory."""
    if kind not in MEMCPY_KINDS:
        raise ValueError(f"memcpyAsync: unknown kind {kind}")
    src_r, dst_r = timeline.region_at(src, src + size), timeline.region_at(dst, dst + size)
    for side, region, want in (("src", src_r, MEMCPY_KINDS[kind][0]), ("dst", dst_r, MEMCPY_KINDS[kind][1])):
        is_dev = region is not None and region.kind == "device"
        if want is not None and is_dev != (want == "device"):
            raise ValueError(f"memcpyAsync kind {kind}: {side} should be {want} memory but is "
                             f"{'device' if is_dev else 'host'} memory")
    timeline.op(_actor_of(stream), f"memcpyAsync kind {kind}", reads=[(src, src + size)], writes=[(dst, dst + size)])
    ctypes.memmove(dst, src, size)


def _device_synchronize():
    for s in list(timeline.streams.values()):
        s.synchronize()


class Device:
    def __init__(self, device=0):
        self.id = int(device)

    def use(self):
        if self.id != 0:
            raise ValueError(f"emulated device: only device 0 exists (asked for {self.id})")

    def synchronize(self):
        _device_synchronize()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


runtime = types.SimpleNamespace(
    memcpyAsync=memcpy_async, getDeviceCount=lambda: 1, deviceSynchronize=_device_synchronize,
    memcpyHostToDevice=1, memcpyDeviceToHost=2, memcpyDeviceToDevice=3, memcpyDefault=4)
cuda = types.SimpleNamespace(Stream=Stream, Event=Event, Device=Device, get_current_stream=get_current_stream,
                             alloc_pinned_memory=alloc_pinned_memory, runtime=runtime, is_available=lambda: True)


class _Ufunc:
    """cupy's ufuncs: NumPy's, refusing NumPy array arguments."""

    def __init__(self, uf):
        self._uf = uf
        self.__name__ = uf.__name__

    def __call__(self, *args, **kwargs):
        return self._method("__call__", args, kwargs)

    def __getattr__(self, method):
        getattr(self._uf, method)
        return lambda *a, **k: self._method(method, a, k)

    def _method(self, method, args, kwargs):
        _unwrap((args, tuple(kwargs.values())), self._uf.__name__, [])  # refuse host arrays
        r = getattr(self._uf, method)(*args, **kwargs)
        return r if isinstance(r, EmuArray) or r is None or _arrays(r) else _wrap(r)


class EmulatedCupy(types.ModuleType):
    """The `cupy` module over EmuArrays: creation functions explicit, every other NumPy function
    wrapped (EmuArrays in and out, NumPy arrays refused); submodules are not provided."""

    def __init__(self):
        super().__init__("emulated_cupy")
        self.ndarray = EmuArray
        self.bfloat16 = bfloat16
        self.cuda = cuda
        self.cupyx = types.SimpleNamespace(scatter_add=lambda dst, idx, src: np.add.at(dst, idx, src))

    def __getattr__(self, name):
        attr = getattr(np, name)
        if isinstance(attr, np.ufunc):
            attr = _Ufunc(attr)
        elif isinstance(attr, types.ModuleType):
            raise AttributeError(f"the emulated device has no cupy.{name}")
        elif callable(attr) and not isinstance(attr, type):
            fn = attr
            attr = lambda *a, **k: _call(fn, a, k, name)  # noqa: E731
        setattr(self, name, attr)  # cache
        return attr

    @staticmethod
    def empty(shape, dtype=float, order="C"):
        return EmuArray(_poisoned(shape, dtype))

    @staticmethod
    def empty_like(a, dtype=None):
        return EmuArray(_poisoned(a.shape, a.dtype if dtype is None else dtype))

    @staticmethod
    def asarray(a, dtype=None, order=None):
        """Device arrays pass through (cast if asked); host data is copied to the device."""
        if isinstance(a, EmuArray):
            return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
        if hasattr(a, "__cuda_array_interface__"):
            raise TypeError(f"emulated device: cannot adopt a foreign device array {type(a).__name__}")
        res = EmuArray(np.array(a, dtype=dtype, copy=True, order=order or "K"))
        _touch("asarray (host to device)", writes=[res])
        return res

    array = asarray

    @staticmethod
    def asnumpy(a, stream=None):
        return a.get() if isinstance(a, EmuArray) else np.asarray(a)

    def get_array_module(self, *args):
        return self


xp = EmulatedCupy()


# ---- the kernels, built from cuda/ with -DRA_EMULATE ---------------------------------------------
class EmulatedKernels:
    """ringattn._cuda's emulated build, with each launch checked as an operation on its stream:
    the first `n` descriptors are inputs, the rest outputs; stream_wait / synchronize order clocks."""

    INPUTS = {"attention_forward": 3, "attention_delta": 2, "attention_backward": 6, "ffn_forward": 5,
              "ffn_backward": 6}

    def __init__(self, module):
        self._mod = module

    def __getattr__(self, name):
        fn = getattr(self._mod, name)
        if name in self.INPUTS:
            def launch(*args, **kwargs):
                descs = [a for a in args if isinstance(a, tuple) and len(a) == 5 and isinstance(a[1], tuple)]
                stream = kwargs.get("stream", args[-1])
                n = self.INPUTS[name]
                timeline.op(_actor_of(stream), name, [_desc_span(d) for d in descs[:n]],
                            [_desc_span(d) for d in descs[n:]])
                return fn(*args, **kwargs)
            return launch
        if name == "stream_wait":
            def stream_wait(consumer, producer):
                consumer_, producer_ = _actor_of(consumer), _actor_of(producer)
                with timeline.lock:
                    consumer_.merge(dict(producer_.clock))
                return fn(consumer, producer)
            return stream_wait
        if name == "synchronize":
            def synchronize(stream):
                timeline.stream(stream).synchronize()
                return fn(stream)
            return synchronize
        return fn


_kernels = None


def kernels():
    """The emulated kernels module (built once per source hash by tests/test_cuda_emulated.py)."""
    global _kernels
    if _kernels is None:
        from test_cuda_emulated import build_emulated

        _kernels = EmulatedKernels(build_emulated())
    return _kernels


def install():
    """Make ringattn.backends.cuda run on this emulated device."""
    from ringattn.backends import cuda as backend

    backend.use_emulation(xp, kernels())


def uninstall():
    from ringattn.backends import cuda as backend

    backend.use_real()


class CheckedComm:
    """A communicator as the device transport sees it: MPI's host reads (Isend) and writes (Irecv)
    reported to the emulator, so a transfer that races a copy or a kernel is a HazardError."""

    def __init__(self, comm):
        self.comm = comm

    def Isend(self, buf, dest, tag):
        host_reads(buf, "MPI Isend")
        return self.comm.Isend(buf, dest=dest, tag=tag)

    def Irecv(self, buf, source, tag):
        host_writes(buf, "MPI Irecv")
        return self.comm.Irecv(buf, source=source, tag=tag)


class ReducingComm:
    """A communicator as the gradient reducer sees it: each (I)Allreduce's buffer recorded in .calls,
    and MPI's host read and write of it reported to the emulator (a missing stream synchronisation
    before it is then a HazardError). Everything else goes to `comm` (default COMM_SELF)."""

    def __init__(self, comm=None):
        if comm is None:
            from mpi4py import MPI
            comm = MPI.COMM_SELF
        self.comm, self.calls = comm, []

    def _record(self, recvbuf, what):
        host_reads(recvbuf, what)
        host_writes(recvbuf, what)
        self.calls.append(recvbuf)

    def Allreduce(self, sendbuf, recvbuf, op):
        self._record(recvbuf, "MPI Allreduce")
        return self.comm.Allreduce(sendbuf, recvbuf, op=op)

    def Iallreduce(self, sendbuf, recvbuf, op):
        self._record(recvbuf, "MPI Iallreduce")
        return self.comm.Iallreduce(sendbuf, recvbuf, op=op)

    def __getattr__(self, name):
        return getattr(self.comm, name)
