"""Exact sequence parallelism of the Blockwise Transformer: on P ranks, the loss and the gradients summed
over ranks equal the single-process model's (LocalAttention) on the same data, for an lm case (zigzag,
striped, labels on the last token only) and a classification case with GQA (contiguous); 13 tokens,
so the shards are uneven. The cases come from tests/test_model.py's make_case.

    mpiexec -n P python -m mpi4py tests/mpi_programs/model_sequence_parallel.py

Rank 0 prints "RESULT <json>": per case the relative loss and gradient errors and whether the stats match.
"""
import json
import os
import sys

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # tests/: make_case
from test_model import make_case  # noqa: E402
from ringattn import layers as L  # noqa: E402
from ringattn.model import BlockwiseTransformer  # noqa: E402
from ringattn.ring import Ring  # noqa: E402

comm = MPI.COMM_WORLD
res = {}
for case, layout, last in (("lm_tokens_causal", "zigzag", False), ("lm_tokens_causal", "striped", False),
                           ("lm_tokens_causal", "zigzag", True), ("cls_real_gqa", "contiguous", False)):
    cfg, params, x, y = make_case(case, 2, 13, 1234, last)   # same data on every rank; 13 tokens: uneven shards
    ref_loss, ref_g, ref_s = BlockwiseTransformer(cfg, L.LocalAttention()).loss_and_grads(params, x, np.arange(13), y)
    ring = Ring(comm, layout=layout)
    model = BlockwiseTransformer(cfg, ring, comm=ring.comm)
    yl = ring.shard(y, axis=1) if cfg.head == "lm" else y
    loss, g, s = model.loss_and_grads(params, ring.shard(x, axis=1), ring.positions(13), yl)
    losses = comm.allgather(loss)
    err = max(abs(l - ref_loss) / abs(ref_loss) for l in losses)
    gerr = 0.0
    for k in sorted(g):
        tot = np.empty_like(g[k])
        comm.Allreduce(np.ascontiguousarray(g[k]), tot)
        gerr = max(gerr, float(np.linalg.norm(tot - ref_g[k]) / max(np.linalg.norm(ref_g[k]), 1e-300)))
    res[case + "/" + layout + ("/last_only" if last else "")] = dict(loss=err, grads=gerr, stats_equal=(s == ref_s))
if comm.Get_rank() == 0:
    print("RESULT " + json.dumps(res))
