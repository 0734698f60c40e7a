"""`ringattn plan`: how much memory attention needs per device, how large a block must be for the
ring to hide communication behind compute, the longest context that fits, and a Slurm layout.

The numbers follow "Ring Attention with Blockwise Transformers for Near-Infinite Context"
(Liu, Zaharia, Abbeel 2023, arXiv 2310.01889). In our own words:

Table 1 (largest activation of one layer, bytes, bfloat16; b batch, s sequence, h hidden width,
n heads, c block size):

    method                           self-attention   feed-forward   peak of the layer
    vanilla                          2bns^2           8bsh           2bns^2 (the score matrices)
    memory-efficient attention       2bsh + 4bch      8bsh           8bsh   (the FFN hidden layer)
    blockwise parallel (BPT)         2bsh             2bsh           2bsh   (the layer output)
    ring attention (per device)      6bch             2bch           6bch   (c = s / devices)

The 8bsh is the FFN hidden activation (width 4h, 2 bytes each): for an FFN multiplier m we use
2m*bsh. Other dtypes scale every entry by bytes/2. "Peak" is the larger of the two columns since
attention and FFN run one after the other.

Overlap condition (Section 3 / Table 2): in one ring step a device multiplies its query block
(c tokens) with one key/value block (c tokens): QK^T and PV cost 2*c*c*h FLOPs each, 4hc^2 in all,
while the next key and value blocks (2*c*h elements, 4ch bytes in bfloat16) travel over the link.
Communication hides behind compute when 4hc^2 / F >= 4ch / B, i.e.

    c >= F / B        (F peak FLOP/s, B unidirectional link bandwidth in bytes/s)

independent of h. With p bytes per element the right-hand side becomes p*F / (2B). With grouped
query attention (GQA/MQA, n_kv of the n heads carry keys and values) the message shrinks to
2*c*h*g*p bytes, g = n_kv / n, while the compute stays 4hc^2: c >= g*p*F / (2B). The paper
then takes the minimal sequence per device as s = 6c. Its Table 2 lists (c, s in thousands):
A100 NVLink 312 TF / 300 GB/s: 1.0, 6.2; A100 InfiniBand 312 TF / 12.5 GB/s: 24.5, 149.5;
TPU v3 123 TF / 112 GB/s: 1.1, 6.6; TPU v4 275 TF / 268 GB/s: 1.0, 6.2;
TPU v5e 196 TF / 186 GB/s: 1.1, 6.3. (F/B gives 24.96K for InfiniBand; the paper prints 24.5K.)
The condition is for the forward pass at peak FLOP/s; real kernels run slower, which only makes
hiding easier, while MPI progress and latency make it harder: measure with `ringattn bench ring`.

Capacity (our own estimate, not from the paper): each device holds the model state
(params * state_bytes, default 16 = bf16 weights and grads + fp32 master weights + Adam moments),
divided by the device count when it is sharded (FSDP-style, the default, as the paper trains), plus,
per device block of c tokens, one checkpointed input per layer (L*b*c*h elements) and the ring
workspace of one layer: query and output (b*c*h elements each) and key, value and the two receive
buffers for the next key and value (b*c*h*g elements each), which is at least the paper's 6bch
bytes. c is the largest shard of the layout: any S >= devices works, and shards differ by at most a
token or two (ringattn.layout), so memory is sized by the largest one.

Attention work per device (our own count, causal; `--window W`: a causal sliding window, each query
sees itself and the W keys before it): a query at global position i sees min(i, W) + 1 keys, and
each visible (query, key) pair costs 4*h FLOPs per sequence forward (QK^T and PV) and 10*h backward
(QK^T recomputed, dV, dP, dQ, dK). A device's work is the sum over its queries (its layout's
positions); the busiest device sets the time. The ring runs only the steps whose blocks some device
can see (ringattn.mask.ring_steps), so a window shorter than a shard with the contiguous layout
needs 2 steps of P, and each block's K/V then travels one hop instead of P - 1.
"""
import json
import math
import sys

import numpy as np

from . import layout as _layout
from . import slurm as _slurm

# name: peak dense bf16 FLOP/s (TF), memory (GB), intra-node and inter-node unidirectional bandwidth
# (GB/s), devices per node. A100 and TPU numbers are the paper's Table 2; H100/H200 are the SXM
# datasheet values (NVLink 4: 900 GB/s both ways; NDR InfiniBand: 400 Gb/s per GPU).
PRESETS = {
    "a100": dict(name="A100", tflops=312.0, memory_gb=80.0, intra_gbs=300.0, inter_gbs=12.5,
                 per_node=8, intra_link="NVLink", inter_link="InfiniBand"),
    "h100": dict(name="H100", tflops=989.0, memory_gb=80.0, intra_gbs=450.0, inter_gbs=50.0,
                 per_node=8, intra_link="NVLink", inter_link="InfiniBand"),
    "h200": dict(name="H200", tflops=989.0, memory_gb=141.0, intra_gbs=450.0, inter_gbs=50.0,
                 per_node=8, intra_link="NVLink", inter_link="InfiniBand"),
    "tpu-v3": dict(name="TPU v3", tflops=123.0, memory_gb=16.0, intra_gbs=112.0, inter_gbs=112.0,
                   per_node=4, intra_link="ICI", inter_link="ICI"),
    "tpu-v4": dict(name="TPU v4", tflops=275.0, memory_gb=32.0, intra_gbs=268.0, inter_gbs=268.0,
                   per_node=4, intra_link="ICI", inter_link="ICI"),
    "tpu-v5e": dict(name="TPU v5e", tflops=196.0, memory_gb=16.0, intra_gbs=186.0, inter_gbs=186.0,
                    per_node=4, intra_link="ICI", inter_link="ICI"),
}

DTYPES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4,
          "fp64": 8, "float64": 8}

# The paper's Table 2 rows (preset, link, minimal block, minimal sequence per device), in tokens.
PAPER_TABLE2 = [("a100", "intra", 1.0e3, 6.2e3), ("a100", "inter", 24.5e3, 149.5e3),
                ("tpu-v3", "intra", 1.1e3, 6.6e3), ("tpu-v4", "intra", 1.0e3, 6.2e3),
                ("tpu-v5e", "intra", 1.1e3, 6.3e3)]


def _positive(name, value, allow_zero=False):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) \
            or value < 0 or (value == 0 and not allow_zero) or math.isinf(value):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return value


def preset(name):
    """Hardware numbers for a preset name ('A100', 'h100', 'TPU v4', 'tpu_v4' all work)."""
    key = str(name).strip().lower().replace(" ", "-").replace("_", "-")
    key = {"tpuv3": "tpu-v3", "tpuv4": "tpu-v4", "tpuv5e": "tpu-v5e"}.get(key, key)
    if key not in PRESETS:
        raise ValueError(f"unknown hardware preset {name!r}; choose one of {', '.join(PRESETS)} "
                         "or give --flops, --memory-gb and --bandwidth-gbs")
    return dict(PRESETS[key], key=key)


def dtype_bytes(dtype):
    """Bytes per element from a name (bf16, fp32, ...) or a number of bytes."""
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    try:
        n = int(dtype)
    except (TypeError, ValueError):
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)} or a byte count")
    if n not in (1, 2, 4, 8):
        raise ValueError(f"dtype size must be 1, 2, 4 or 8 bytes, got {n}")
    return n


def parse_tokens(text):
    """'1M' -> 1048576, '512K' -> 524288, '6200' -> 6200 (K and M are powers of two, as usual for
    context lengths)."""
    t = str(text).strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    num = t[:-1] if scale > 1 else t
    try:
        value = float(num) * scale
    except ValueError:
        raise ValueError(f"cannot read a token count from {text!r} (examples: 8192, 512K, 1M)")
    if value != int(value) or value < 1:
        raise ValueError(f"token count must be a positive whole number, got {text!r}")
    return int(value)


def min_block_size(flops, bandwidth, nbytes=2, kv_fraction=1.0):
    """Smallest block c (tokens) whose attention compute 4hc^2/F covers sending the next K and V
    blocks, 2*c*h*g*nbytes / B: c >= g * nbytes * F / (2 * B), g = kv heads / heads. flops in
    FLOP/s, bandwidth in bytes/s."""
    _positive("FLOP/s", flops)
    _positive("bandwidth", bandwidth)
    _positive("kv fraction", kv_fraction)
    return kv_fraction * nbytes * flops / (2.0 * bandwidth)


def min_seq_per_device(block):
    """The paper's minimal sequence per device: six blocks."""
    return 6.0 * block


def activation_bytes(batch, seq, hidden, heads, block, nbytes=2, ffn_mult=4, kv_heads=None):
    """Table 1: per-layer peak activation bytes {method: {attention, ffn, peak}}. For ring
    attention `block` is the per-device block c; for the others `block` is the chunk size of the
    memory-efficient attention (it only enters the 4bch term). With kv_heads < heads (GQA) the key
    and value terms shrink by g = kv_heads / heads: ring 2bch + 4bch*g, memory-efficient
    2bsh + 4bch*g; kv_heads = heads gives the paper's table."""
    kv_heads = heads if kv_heads is None else kv_heads
    for name, v in (("batch", batch), ("sequence", seq), ("hidden", hidden), ("heads", heads),
                    ("block", block), ("bytes", nbytes), ("ffn multiplier", ffn_mult),
                    ("kv heads", kv_heads)):
        _positive(name, v)
    b, s, h, n, c, k, g = batch, seq, hidden, heads, block, nbytes / 2.0, kv_heads / heads
    rows = {
        "vanilla": (2 * b * n * s * s, 2 * ffn_mult * b * s * h),
        "memory_efficient": (2 * b * s * h + 4 * b * c * h * g, 2 * ffn_mult * b * s * h),
        "bpt": (2 * b * s * h, 2 * b * s * h),
        "ring": (2 * b * c * h + 4 * b * c * h * g, 2 * b * c * h),
    }
    return {m: dict(attention=a * k, ffn=f * k, peak=max(a, f) * k) for m, (a, f) in rows.items()}


def model_params(hidden, layers, ffn_mult=4, vocab=0, kv_fraction=1.0):
    """Weights of a plain Transformer: attention 2h^2 (query, output) + 2h^2*g (key, value; g = kv
    heads / heads) + FFN 2*m*h^2 per layer, plus embeddings."""
    return layers * (2 + 2 * kv_fraction + 2 * ffn_mult) * hidden * hidden + vocab * hidden


def ring_bytes_per_token(batch, hidden, layers, nbytes, kv_fraction=1.0):
    """Activation bytes per token of the device's block: L checkpoints, query and output at full
    width, key, value and their two receive buffers at kv width (g = kv heads / heads)."""
    return batch * hidden * nbytes * (layers + 2 + 4 * kv_fraction)


def ring_message_bytes(batch, block, hidden, nbytes, kv_fraction=1.0):
    """One forward ring message: the K and V of a block of `block` tokens, packed together."""
    return 2 * batch * block * hidden * kv_fraction * nbytes


def shard_range(seq, devices, layout="zigzag"):
    """(smallest, largest) tokens per device when `seq` tokens are sharded over `devices` by
    `layout` (ringattn.layout: any seq >= devices; memory follows the largest shard)."""
    _layout.check_layout(layout)
    if seq < devices:
        raise ValueError(f"sequence {seq} is shorter than {devices} devices: every device needs at "
                         "least one token")
    sizes = [_layout.local_len(seq, devices, r, layout) for r in _boundary_ranks(seq, devices)]
    return min(sizes), max(sizes)


def _boundary_ranks(seq, devices):
    """Ranks that between them hold the smallest and the largest shard of every layout, so a plan
    for many devices asks local_len a handful of times instead of once per rank. Chunks of P or 2P
    differ by one token, the first (seq mod chunks) being larger; a rank's count can change only
    where its chunk (r, or 2P-1-r for zigzag) crosses that boundary, plus the two ends."""
    ranks = {0, devices - 1}
    for x in (seq % devices, seq % (2 * devices), 2 * devices - seq % (2 * devices)):
        ranks.update(r for r in (x - 1, x) if 0 <= r < devices)
    return sorted(ranks)


def max_context(memory_bytes, devices, batch, hidden, layers, nbytes, state_bytes, kv_fraction=1.0):
    """Longest total sequence (tokens) that fits: devices * the largest block c with
    state_bytes + c * ring_bytes_per_token <= memory_bytes. 0 when the model alone does not fit."""
    free = memory_bytes - state_bytes
    if free <= 0:
        return 0
    return devices * int(free // ring_bytes_per_token(batch, hidden, layers, nbytes, kv_fraction))


def visible_pairs(positions, window=None):
    """(query, key) pairs a causal query set sees: sum over i of min(i, window) + 1 (window None: i + 1)."""
    pos = np.asarray(positions, dtype=np.int64)
    return int((pos if window is None else np.minimum(pos, window)).sum() + pos.size)


def attention_work(seq, devices, layout, batch, hidden, flops, window=None):
    """Per-layer causal attention work of every device (FLOPs, time at peak) and the ring steps, with
    the sliding window `window` (None: causal, no window)."""
    from .mask import Mask, ring_steps
    if window is not None and (int(window) != window or window < 0):
        raise ValueError(f"window must be a whole number >= 0 (keys before each query), got {window!r}")
    pairs = [visible_pairs(_layout.positions(seq, devices, r, layout), window) for r in range(devices)]
    fwd = [4.0 * batch * hidden * n for n in pairs]
    busiest = max(fwd)
    return dict(window=window, ring_steps=ring_steps(Mask(True, -1 if window is None else int(window), 0),
                                                     seq, devices, layout),
                fwd_flops_per_device=fwd, fwd_flops_busiest=busiest, fwd_bwd_flops_busiest=busiest * 14 / 4,
                fwd_s_busiest=busiest / flops, fwd_bwd_s_busiest=busiest * 14 / 4 / flops,
                balance=min(fwd) / busiest)


def slurm_layout(devices, per_node):
    """(nodes, tasks per node): one MPI rank per device, nodes filled first."""
    _positive("devices", devices)
    _positive("devices per node", per_node)
    nodes = -(-devices // per_node)
    return nodes, min(devices, per_node)


# How examples/slurm/train_gpu.sbatch starts one rank per GPU: the --mpi plugin comes from
# `python -m ringattn.slurm srun-mpi` ($RINGATTN_SRUN_MPI, else what `srun --mpi=list` offers that
# suits the MPI library), cores bound to each rank, one GPU per rank.
SRUN_BINDING = ("--cpu-bind=cores", "--gpu-bind=single:1")


def srun_line(command="python -m mpi4py -m ringattn train --device cuda ..."):
    """The launch line `plan` prints, with the plugin choice and binding flags of the scripts."""
    return "srun --mpi=$(python -m ringattn.slurm srun-mpi) " + " ".join(SRUN_BINDING) + " " + command


def plan(*, hw, hidden=4096, layers=32, heads=32, kv_heads=None, ffn_mult=4, seq=1 << 20,
         dtype="bf16", batch=1, devices=8, layout="zigzag", link="auto", state_bytes_per_param=16,
         mem_fraction=0.9, vocab=0, shard_state=True, window=None):
    """Everything `ringattn plan` prints, as a dict. hw is a preset() dict (or the same keys).
    kv_heads (default: heads) below heads is grouped-query attention: smaller K/V blocks, messages
    and projections. window: a causal sliding window of that many keys before each query, for the
    attention work and ring steps (None: causal, no window)."""
    nbytes = dtype_bytes(dtype)
    kv_heads = heads if kv_heads is None else kv_heads
    for name, v in (("hidden", hidden), ("layers", layers), ("heads", heads), ("kv heads", kv_heads),
                    ("batch", batch), ("devices", devices), ("sequence", seq),
                    ("ffn multiplier", ffn_mult)):
        _positive(name, v)
    for name, v in (("hidden", hidden), ("layers", layers), ("heads", heads), ("kv heads", kv_heads),
                    ("batch", batch), ("devices", devices), ("sequence", seq)):
        if int(v) != v:
            raise ValueError(f"{name} must be a whole number, got {v!r}")
    _positive("bytes per parameter", state_bytes_per_param, allow_zero=True)
    _positive("vocabulary", vocab, allow_zero=True)
    if not 0 < mem_fraction <= 1:
        raise ValueError(f"memory fraction must be in (0, 1], got {mem_fraction!r}")
    if hidden % heads:
        raise ValueError(f"hidden width {hidden} is not divisible by {heads} heads")
    if heads % kv_heads:
        raise ValueError(f"{heads} heads are not divisible by {kv_heads} kv heads (GQA needs a whole "
                         "number of query heads per key/value head)")
    for key in ("tflops", "memory_gb", "intra_gbs", "inter_gbs", "per_node"):
        _positive(key, hw[key])
    nodes, per_node = slurm_layout(devices, int(hw["per_node"]))
    if link not in ("auto", "intra", "inter"):
        raise ValueError(f"link must be auto, intra or inter, got {link!r}")
    if link == "auto":  # a ring that leaves the node runs at the speed of its slowest hop
        link = "intra" if nodes == 1 else "inter"
    smallest, block = shard_range(seq, devices, layout)
    g = kv_heads / heads
    bandwidth = hw[f"{link}_gbs"] * 1e9
    flops = hw["tflops"] * 1e12
    c_min = min_block_size(flops, bandwidth, nbytes, g)
    memory = hw["memory_gb"] * 1e9 * mem_fraction
    params = model_params(hidden, layers, ffn_mult, vocab, g)
    state = params * state_bytes_per_param / (devices if shard_state else 1)
    act = activation_bytes(batch, seq, hidden, heads, block, nbytes, ffn_mult, kv_heads)
    ring_total = state + block * ring_bytes_per_token(batch, hidden, layers, nbytes, g)
    return dict(
        hardware=dict(name=hw.get("name", "custom"), tflops=hw["tflops"], memory_gb=hw["memory_gb"],
                      link=hw.get(f"{link}_link", link), bandwidth_gbs=bandwidth / 1e9),
        model=dict(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, ffn_mult=ffn_mult,
                   vocab=vocab, params=params, state_bytes=state, state_sharded=bool(shard_state)),
        seq=seq, devices=devices, layout=layout, batch=batch, dtype_bytes=nbytes,
        block_per_device=block, smallest_block_per_device=smallest,
        activation_bytes_per_layer=act,
        ring_message_bytes=ring_message_bytes(batch, block, hidden, nbytes, g),
        ring_bytes_per_device=ring_total, fits=ring_total <= memory,
        min_block=c_min, min_seq_per_device=min_seq_per_device(c_min),
        overlap_ok=block >= min_seq_per_device(c_min),
        attention=attention_work(seq, devices, layout, batch, hidden, flops, window),
        attention_no_window=attention_work(seq, devices, layout, batch, hidden, flops) if window is not None else None,
        max_context=max_context(memory, devices, batch, hidden, layers, nbytes, state, g),
        # the same device without the ring (blockwise transformer alone): the whole sequence local
        max_context_without_ring=max_context(memory, 1, batch, hidden, layers, nbytes, state, g),
        usable_memory_bytes=memory,
        slurm=dict(nodes=nodes, tasks_per_node=per_node, gpus_per_node=per_node, srun=srun_line()),
    )


def table2():
    """The paper's Table 2 recomputed: rows of (label, c_min, s_min, paper c, paper s)."""
    rows = []
    for key, link, c_paper, s_paper in PAPER_TABLE2:
        hw = PRESETS[key]
        c = min_block_size(hw["tflops"] * 1e12, hw[f"{link}_gbs"] * 1e9)
        rows.append((f"{hw['name']} {hw[link + '_link']}", c, min_seq_per_device(c), c_paper, s_paper))
    return rows


def _size(nbytes):
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def _tokens(n):
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else f"{n:.0f}"


def _shards(p):
    lo, hi = p["smallest_block_per_device"], p["block_per_device"]
    return f"{hi} tokens" if lo == hi else f"{lo}-{hi} tokens"


def format_plan(p):
    hw, m = p["hardware"], p["model"]
    s = p["slurm"]
    lines = [
        f"hardware: {hw['name']}, {hw['tflops']:g} TFLOP/s, {hw['memory_gb']:g} GB, "
        f"{hw['link']} {hw['bandwidth_gbs']:g} GB/s",
        f"model: hidden {m['hidden']}, {m['layers']} layers, {m['heads']} heads"
        + (f" ({m['kv_heads']} kv heads, GQA)" if m["kv_heads"] != m["heads"] else "")
        + f", FFN x{m['ffn_mult']:g}, "
        f"{m['params'] / 1e9:.2f}B params, model state {_size(m['state_bytes'])} per device"
        + (" (sharded)" if m["state_sharded"] else ""),
        f"sequence {p['seq']} over {p['devices']} devices ({p['layout']}): {_shards(p)} per device, "
        f"batch {p['batch']}, {p['dtype_bytes']} bytes per element",
        "",
        "activation memory of one layer per device (paper Table 1; the first three hold the whole",
        "sequence on every device, ring attention its largest shard):",
        f"  {'method':<28}{'attention':>12}{'ffn':>12}{'peak':>12}",
    ]
    names = dict(vanilla="vanilla", memory_efficient="memory-efficient attention",
                 bpt="blockwise parallel (BPT)", ring="ring attention")
    for key, row in p["activation_bytes_per_layer"].items():
        lines.append(f"  {names[key]:<28}{_size(row['attention']):>12}{_size(row['ffn']):>12}"
                     f"{_size(row['peak']):>12}")
    lines += [
        "",
        f"minimum block for overlap (c >= F/B): {_tokens(p['min_block'])} tokens; "
        f"minimum sequence per device (6c): {_tokens(p['min_seq_per_device'])}"
        + ("" if p["overlap_ok"] else "  <- per-device block is smaller: communication may show"),
        f"ring message per step (K and V of the largest block): {_size(p['ring_message_bytes'])} "
        "forward, twice that backward (with dK, dV)",
        *_format_attention(p),
        f"ring attention total per device: {_size(p['ring_bytes_per_device'])} of "
        f"{_size(p['usable_memory_bytes'])} usable -> {'fits' if p['fits'] else 'DOES NOT FIT'}",
        f"largest context that fits on {p['devices']} devices: {_tokens(p['max_context'])} tokens "
        f"(blockwise without the ring: {_tokens(p['max_context_without_ring'])})",
        "",
        f"slurm: {s['nodes']} node(s) x {s['tasks_per_node']} tasks (one rank per device; "
        "examples/slurm/train_gpu.sbatch is a complete script)",
        f"  #SBATCH --nodes={s['nodes']}",
        f"  #SBATCH --ntasks-per-node={s['tasks_per_node']}",
        f"  #SBATCH --gpus-per-node={s['gpus_per_node']}",
        f"  {s['srun']}",
        f"  (--mpi: ${_slurm.SRUN_MPI_ENV} when set, else a plugin from `srun --mpi=list` that suits the MPI "
        "library)",
    ]
    return "\n".join(lines)


def _format_attention(p):
    a, full = p["attention"], p["attention_no_window"]
    what = "causal" if a["window"] is None else f"causal, window {a['window']}"

    def line(w, label):
        return (f"  {label}: {_flops(w['fwd_flops_busiest'])} forward, {w['fwd_s_busiest'] * 1e3:.3g} ms at peak "
                f"({w['fwd_bwd_s_busiest'] * 1e3:.3g} ms with backward); least/most loaded device "
                f"{w['balance']:.2f}; ring steps {w['ring_steps']} of {p['devices']}")
    out = [f"attention per layer, busiest device ({what}):", line(a, "with the window" if full else "causal")]
    if full:
        out.append(line(full, "without window "))
        out.append(f"  window / no window: {a['fwd_flops_busiest'] / full['fwd_flops_busiest']:.3g} of the work")
    return out


def _flops(n):
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} FLOP"


def format_table2(rows):
    lines = [f"{'hardware':<20}{'min block':>11}{'paper':>9}{'min seq/dev':>13}{'paper':>9}"]
    for label, c, s, cp, sp in rows:
        lines.append(f"{label:<20}{_tokens(c):>11}{_tokens(cp):>9}{_tokens(s):>13}{_tokens(sp):>9}")
    return "\n".join(lines)


def add_arguments(parser):
    hw = parser.add_argument_group("hardware (a preset, optionally overridden field by field)")
    hw.add_argument("--hw", "--preset", dest="hw", default="A100",
                    help=f"one of {', '.join(PRESETS)}, or 'custom' with the numbers below")
    hw.add_argument("--flops", type=float, help="peak FLOP/s per device, in TFLOP/s")
    hw.add_argument("--memory-gb", type=float, help="device memory, GB")
    hw.add_argument("--bandwidth-gbs", type=float, help="link bandwidth inside a node, GB/s one way")
    hw.add_argument("--inter-bandwidth-gbs", type=float, help="link bandwidth between nodes, GB/s")
    hw.add_argument("--devices-per-node", type=int, help="GPUs (or chips) per node")
    hw.add_argument("--link", default="auto", choices=["auto", "intra", "inter"],
                    help="which link the ring runs over; auto: intra if it fits on one node")
    parser.add_argument("--hidden", type=int, default=4096, help="model width h")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None,
                        help="key/value heads (grouped-query attention; default: --heads)")
    parser.add_argument("--layout", default="zigzag", choices=_layout.LAYOUTS,
                        help="how the sequence is sharded (any length >= --devices works)")
    parser.add_argument("--window", type=int, default=None, metavar="W",
                        help="causal sliding window (keys before each query) for the attention work and ring "
                             "steps; not given: causal, no window")
    parser.add_argument("--ffn-mult", type=float, default=4, help="FFN hidden width / h")
    parser.add_argument("--vocab", type=int, default=0, help="vocabulary size (embedding params)")
    parser.add_argument("--seq", default="1M", help="total sequence length (e.g. 65536, 512K, 1M)")
    parser.add_argument("--dtype", default="bf16", help="bf16, fp16, fp32, fp64, or bytes")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--devices", type=int, default=8, help="devices in the ring (MPI ranks)")
    parser.add_argument("--state-bytes-per-param", type=float, default=16,
                        help="model state per parameter (16: mixed-precision Adam; 2: bf16 inference)")
    parser.add_argument("--no-shard-state", dest="shard_state", action="store_false",
                        help="every device holds the whole model state (default: sharded, FSDP-style)")
    parser.add_argument("--mem-fraction", type=float, default=0.9,
                        help="share of device memory the planner may use")
    parser.add_argument("--table2", action="store_true", help="print the paper's Table 2 recomputed")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def hardware_from_args(args):
    if str(args.hw).lower() == "custom":
        missing = [f for f in ("flops", "memory_gb", "bandwidth_gbs") if getattr(args, f) is None]
        if missing:
            raise ValueError("custom hardware needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
        hw = dict(name="custom", tflops=args.flops, memory_gb=args.memory_gb,
                  intra_gbs=args.bandwidth_gbs, inter_gbs=args.inter_bandwidth_gbs or args.bandwidth_gbs,
                  per_node=args.devices_per_node or 8, intra_link="intra-node", inter_link="inter-node")
    else:
        hw = preset(args.hw)
    for field, attr in (("tflops", "flops"), ("memory_gb", "memory_gb"), ("intra_gbs", "bandwidth_gbs"),
                        ("inter_gbs", "inter_bandwidth_gbs"), ("per_node", "devices_per_node")):
        value = getattr(args, attr)
        if value is not None:
            _positive("--" + attr.replace("_", "-"), value)
            hw[field] = value
    return hw


def run(args):
    try:
        if args.table2:
            rows = table2()
            if args.json:
                print(json.dumps([dict(hardware=r[0], min_block=r[1], min_seq_per_device=r[2],
                                       paper_min_block=r[3], paper_min_seq_per_device=r[4])
                                  for r in rows], indent=2))
            else:
                print(format_table2(rows))
            return 0
        p = plan(hw=hardware_from_args(args), hidden=args.hidden, layers=args.layers,
                 heads=args.heads, kv_heads=args.kv_heads, ffn_mult=args.ffn_mult,
                 seq=parse_tokens(args.seq), dtype=args.dtype, batch=args.batch,
                 devices=args.devices, layout=args.layout, link=args.link,
                 state_bytes_per_param=args.state_bytes_per_param, mem_fraction=args.mem_fraction,
                 vocab=args.vocab, shard_state=args.shard_state, window=args.window)
    except ValueError as e:
        print(f"ringattn plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(p, indent=2) if args.json else format_plan(p))
    return 0
