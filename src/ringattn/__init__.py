"""ringattn: exact attention over sequences sharded across MPI ranks (ring attention).

    out, lse = ringattn.attention_forward(q, k, v, causal=True)
    ring = ringattn.Ring(comm, layout="zigzag")
"""
__version__ = "0.1.0"

from . import reference
from .api import attention_backward, attention_forward
from .ring import Ring

__all__ = ["attention_forward", "attention_backward", "Ring", "reference", "__version__"]
