"""Kernel threads per rank: OpenMP (the C++ kernels) and OpenBLAS (NumPy), set after start-up.

Without a choice every rank would start one thread per core of its node and the ranks of a node
would fight for the cores; configure_threads picks the cores a rank may use divided by the ranks
sharing them, unless --threads or OMP_NUM_THREADS says otherwise, and warns when a node is
oversubscribed. Idle OpenMP threads sleep rather than spin (passive_wait_by_default), so
oversubscribed ranks do not spin-wait each other out.
"""
import os

from . import watchdog


def my_cores():
    """The cores this process may run on (its affinity mask)."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return frozenset(range(os.cpu_count() or 1))


def passive_wait_by_default(environ=os.environ):
    """Make idle OpenMP threads sleep instead of spinning, unless the user chose (OMP_WAIT_POLICY or
    GOMP_SPINCOUNT set). Call before libgomp loads: it reads these once, when it loads (the kernels
    module calls this before importing ringattn._cpu).

    Why: libgomp's default spins for a long while at every barrier and at the end of every parallel
    region. When the ranks x threads of a node exceed its cores (4 ranks x 2 threads on 2 cores), a
    spinning thread holds a core that another rank's thread needs to reach the same barrier, and the
    step slows several-fold (benchmarks/results/oversubscribed.txt). Sleeping costs a wake-up per
    region, which the kernels' regions are long enough to pay. Returns True when it set the policy.
    """
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return False
    environ["OMP_WAIT_POLICY"] = "passive"
    return True


def set_threads(n):
    """Set OpenMP (kernels) and OpenBLAS (NumPy) threads of this process to n, after start-up.

    OMP_NUM_THREADS is read when the libraries load, which happened on `import ringattn`; so call
    the libraries' own setters through ctypes. Returns the libraries that accepted the setting.
    """
    import ctypes
    done = []
    with open("/proc/self/maps") as f:
        libs = sorted({ln.split()[-1] for ln in f if ".so" in ln and ("gomp" in ln or "openblas" in ln)})
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in ("omp_set_num_threads", "openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
                    "openblas_set_num_threads64_"):
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn(ctypes.c_int(int(n)))
                done.append(sym)
                break
    os.environ["OMP_NUM_THREADS"] = str(n)  # for any child processes (and libraries not loaded yet)
    return done


def default_threads(mine, node_masks):
    """Kernel threads for a rank: the cores it may use (`mine`, a set of core ids) divided by the
    ranks of its node whose cores overlap them (`node_masks`, one set per node-local rank, itself
    included), at least 1. Unbound ranks all overlap and share the cores; ranks bound to their
    own cores keep all of them."""
    sharing = sum(1 for m in node_masks if m & mine)
    return max(1, len(mine) // max(sharing, 1))


def oversubscription(node_masks, node_threads):
    """(threads, cores) of one node when its ranks' threads exceed the cores they may use, else None."""
    cores = len(set().union(*node_masks))
    threads = sum(node_threads)
    return (threads, cores) if threads > cores else None


def _env_threads():
    """OMP_NUM_THREADS as an int (its first level when nested, "4,2"), or None when unset/unparsable."""
    text = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def configure_threads(world, requested=0):
    """Choose and set this rank's kernel threads; collective over `world`. Returns (threads, warning).

    requested > 0 (--threads) wins, then OMP_NUM_THREADS; with neither, default_threads: without it
    every rank would start one thread per core of the node and the ranks would fight for them.
    warning (rank 0, else None): one line when some node runs more threads than its cores.
    """
    from mpi4py import MPI
    mine = my_cores()
    with watchdog.guard("thread setup (node-local allgather)", None, world):
        local = world.Split_type(MPI.COMM_TYPE_SHARED)
        masks = local.allgather(mine)
        n = requested or _env_threads()
        if requested or n is None:
            n = requested or default_threads(mine, masks)
            set_threads(n)
        node_threads = local.allgather(n)
        over = oversubscription(masks, node_threads)
        first = local.Get_rank() == 0
        local.Free()
        report = (os.uname().nodename, node_threads, over) if over and first else None
        reports = world.gather(report, root=0)
    warning = None
    bad = [r for r in (reports or []) if r]
    if bad:
        host, node_threads, (threads, cores) = bad[0]
        t0 = node_threads[0]
        per = (f"{len(node_threads)} ranks x {t0} thread{'' if t0 == 1 else 's'}" if len(set(node_threads)) == 1
               else f"{len(node_threads)} ranks with {threads} threads in all")
        warning = (f"warning: {per} on {cores} cores of {host}"
                   f"{f' (and {len(bad) - 1} more nodes)' if len(bad) > 1 else ''}: the ranks compete for cores "
                   f"and run slower; use fewer ranks per node, or --threads / OMP_NUM_THREADS")
    return n, warning
