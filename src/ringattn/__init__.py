"""ringattn: exact attention over sequences sharded across MPI ranks (ring attention).

    out, lse = ringattn.attention_forward(q, k, v, causal=True)
    ring = ringattn.Ring(comm, layout="zigzag")

The kernel-backed names load on first use, so `ringattn info` still works (and reports the
problem) when the compiled module cannot be loaded.
"""
__version__ = "0.1.0"

_LAZY = {
    "attention_forward": "api",
    "attention_backward": "api",
    "Ring": "ring",
    "reference": None,
}

__all__ = ["attention_forward", "attention_backward", "Ring", "reference", "__version__"]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'ringattn' has no attribute {name!r}")
    import importlib

    if _LAZY[name] is None:
        return importlib.import_module(f".{name}", __name__)
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
