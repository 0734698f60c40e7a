"""`ringattn train --device cuda` on the emulated device (tests/emu_device.py: host memory behind
__cuda_array_interface__, the CUDA kernels built with -DRA_EMULATE): the loss curve equals the CPU
run of the same flags at 1, 2 and 4 ranks and several sp x dp splits, in both gradient/transport
modes (pinned staging, CUDA-aware); a device checkpoint resumes on the CPU; what cannot run on the
GPU fails at startup with one line; the gradient reducer sends one message per step from the right
buffer; each rank takes GPU (node-local rank mod visible GPUs)."""
import json
import types

import numpy as np
import pytest

import emu_device as emu
from mpi_util import run_file, run_mpi
from ringattn import backends, gradients, parallel, tasks

pytestmark = pytest.mark.mpi

# Small: the emulator runs every CUDA thread on the host (one layer, one FFN chunk per call).
SMALL = ["--seq-len", "16", "--width", "8", "--layers", "1", "--heads", "1", "--batch", "2", "--curriculum", "none",
         "--steps", "20", "--warmup", "5", "--lr", "1e-2", "--log-interval", "1", "--eval-size", "2",
         "--target-accuracy", "0", "--no-progress", "--min-shard", "1", "--ffn-chunk", "256", "--check-interval", "5",
         "--seed", "3"]
STAGED = {"RINGATTN_CUDA_AWARE_MPI": "0"}
AWARE = {"RINGATTN_CUDA_AWARE_MPI": "1"}


@pytest.fixture(scope="module", autouse=True)
def emulated_kernels():
    emu.kernels()  # build them once here (or skip without the CUDA headers); the jobs load the cached build


def curve(path):
    rows = [json.loads(line) for line in open(path)]
    return [r["loss"] for r in rows if "loss" in r and not r.get("final")], rows


def train_pair(tmp_path, n, flags, env):
    """(device losses, CPU losses, device stderr) of the same flags on n ranks."""
    dev, cpu = tmp_path / "cuda.jsonl", tmp_path / "cpu.jsonl"
    res = run_file(n, "train_device.py", ["--", *flags, "--metrics-out", dev], timeout=240, env=env)
    run_mpi(n, module="ringattn", args=["train", *flags, "--metrics-out", cpu], timeout=120)
    (got, rows), (ref, _) = curve(dev), curve(cpu)
    assert len(got) == len(ref) == 20 and rows[-1]["final"]
    return np.array(got), np.array(ref), rows, res.stderr


@pytest.mark.parametrize("n, sp, task, env", [
    (1, 1, "needle", STAGED),
    (2, 1, "needle", STAGED),      # data-parallel only
    (2, 2, "synthetic", STAGED),   # the device Ring; the 'cls' head (pooled sums) on 'real' inputs
    (4, 2, "needle", AWARE),       # sp 2 x dp 2; device buffers straight to MPI
    (4, 4, "needle", STAGED),      # a ring of 4
])
def test_loss_curve_equals_cpu(tmp_path, n, sp, task, env):
    flags = SMALL + ["--sp", str(sp), "--task", task]
    got, ref, rows, err = train_pair(tmp_path, n, flags, env)
    rel = np.abs(got - ref) / np.abs(ref)
    assert rel.max() < 1e-4, (got, ref)
    assert np.ptp(ref) > 1e-2  # the curve moves: the comparison is not vacuous
    last = [r for r in rows if r.get("step") == 20 and "loss" in r][0]
    assert (last["sp"], last["dp"]) == (sp, n // sp)
    assert abs(rows[-1]["eval_loss"] / curve(tmp_path / "cpu.jsonl")[1][-1]["eval_loss"] - 1) < 1e-4
    mode = "CUDA-aware MPI" if env is AWARE else "pinned host staging"
    assert f"ringattn train: task {task}, {n} ranks, cuda (one GPU per rank" in err and mode in err


def test_device_checkpoint_resumes_on_the_cpu(tmp_path):
    """Checkpoints are written from host copies: a device run's checkpoint continues the CPU curve."""
    d, flags = tmp_path / "ck", SMALL + ["--checkpoint-interval", "10"]
    run_file(1, "train_device.py", ["--", *flags, "--checkpoint-dir", d, "--run-steps", "10",
                                    "--metrics-out", tmp_path / "a.jsonl"], timeout=240, env=STAGED)
    run_mpi(1, module="ringattn", args=["train", *flags, "--checkpoint-dir", d, "--resume",
                                        "--metrics-out", tmp_path / "b.jsonl"], timeout=120)
    run_mpi(1, module="ringattn", args=["train", *flags, "--metrics-out", tmp_path / "ref.jsonl"], timeout=120)
    got = np.array(curve(tmp_path / "a.jsonl")[0] + curve(tmp_path / "b.jsonl")[0])
    ref = np.array(curve(tmp_path / "ref.jsonl")[0])
    assert len(got) == len(ref) == 20 and (np.abs(got - ref) / np.abs(ref)).max() < 1e-4, (got, ref)


@pytest.mark.parametrize("n, mode, flags, msg", [
    (2, "emulated", ["--dtype", "float64"], "--dtype float64 is not supported with --device cuda"),
    (2, "no-emulation", [], "--device cuda: rank 0 on "),
    (1, "no-cuda-module", [], "built without its CUDA module"),
    (1, "no-gpu", [], "no CUDA device visible"),
])
def test_unsupported_fails_at_startup_with_one_line(n, mode, flags, msg):
    res = run_file(n, "train_device.py", [mode, "--", *SMALL, *flags], timeout=120, check=False)
    assert res.returncode == 2, (res.stdout[-2000:], res.stderr[-2000:])
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("ringattn train")]
    assert len(lines) == 1 and lines[0].startswith("ringattn train: error: ") and msg in lines[0], res.stderr
    assert "Traceback" not in res.stderr and "step 1:" not in res.stderr  # before any step
    if mode == "no-emulation":
        assert "CuPy is required" in lines[0] and "(and 1 more ranks)" in lines[0]


@pytest.fixture
def device():
    emu.install()
    yield backends.cuda
    emu.uninstall()


@pytest.mark.parametrize("aware", [False, True])
def test_gradient_reducer_one_message_per_step(device, aware):
    rng = np.random.default_rng(7)
    host = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in
            (("b", (3, 5)), ("a", (7,)), ("c", (2, 2, 2)))}
    comm = emu.ReducingComm()
    reduce = gradients.GradientReducer(comm, cuda_aware=aware)
    for step in range(2):  # the second step reuses the first step's buffers
        grads = {k: device.asarray(v * (step + 1)) for k, v in host.items()}
        extras = reduce(grads, 2, extra=[1.5, 3.0, 4.0], step=step)
        assert len(comm.calls) == step + 1
        assert np.array_equal(extras, [1.5, 3.0, 4.0]) and extras.dtype == np.float64
        for k, v in host.items():
            assert device.is_mine(grads[k])
            np.testing.assert_array_equal(device.to_host(grads[k]), v * (step + 1) / np.float32(2))
    first, second = comm.calls
    assert first is second  # one buffer kept across steps
    assert device.is_mine(first) == aware  # CUDA-aware: the device buffer; staged: the pinned host mirror
    assert first.dtype == np.float32 and first.size == 15 + 7 + 8 + 3


def test_gradient_reducer_host_matches_allreduce_mean():
    rng = np.random.default_rng(8)
    grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in (("x", (4, 3)), ("y", (5,)))}
    want = {k: v / np.float32(3) for k, v in grads.items()}
    comm = emu.ReducingComm()
    out = gradients.GradientReducer(comm)(grads, 3, extra=[2.0], step=1)
    assert len(comm.calls) == 1 and isinstance(comm.calls[0], np.ndarray) and out.tolist() == [2.0]
    for k in grads:
        np.testing.assert_array_equal(grads[k], want[k])


class FakeGpus:
    """Just enough of backends.cuda for parallel._start_gpu: `count` visible GPUs, records Device(i).use()."""

    def __init__(self, count):
        self.used = []
        use = lambda i: types.SimpleNamespace(use=lambda: self.used.append(i))  # noqa: E731
        self.xp = types.SimpleNamespace(cuda=types.SimpleNamespace(
            runtime=types.SimpleNamespace(getDeviceCount=lambda: count), Device=use))
        self.array_module, self.module = (lambda: self.xp), (lambda: None)
        self.zeros, self.to_host = (lambda shape, dtype: np.zeros(shape, dtype)), np.asarray
        self.ffn_forward = lambda x, *a, **k: x


def test_gpu_is_node_local_rank_modulo_visible():
    be = FakeGpus(4)
    assert [parallel._start_gpu(be, r) for r in range(6)] == [(0, 4), (1, 4), (2, 4), (3, 4), (0, 4), (1, 4)]
    assert be.used == [0, 1, 2, 3, 0, 1]
    one = FakeGpus(1)  # srun --gpus-per-task=1: every rank sees only its own GPU
    assert [parallel._start_gpu(one, r)[0] for r in range(3)] == [0, 0, 0]
    with pytest.raises(RuntimeError, match="no CUDA device visible"):
        parallel._start_gpu(FakeGpus(0), 0)


@pytest.mark.parametrize("task, kv_heads", [("needle", 0), ("needle", 1), ("synthetic", 0)])
def test_model_on_the_device_equals_the_host(device, task, kv_heads):
    """One forward/backward of the whole model with device parameters (every layer through the
    backend: embedding scatter-add, RoPE tables, kernels, both loss heads, GQA) vs the host model."""
    from ringattn.layers import LocalAttention
    from ringattn.model import BlockwiseTransformer, ModelConfig, init_params
    cfg = ModelConfig.for_task(task, width=16, layers=2, heads=2, kv_heads=kv_heads, ffn_chunk=5)
    params = init_params(cfg, seed=4)
    x, y = tasks.get(task)(types.SimpleNamespace(seed=5, seq_len=13, in_features=8, train_size=0)).batch(0, 13, 3)
    pos = np.arange(13)
    model = BlockwiseTransformer(cfg, LocalAttention())
    loss, grads, stats = model.loss_and_grads(params, x, pos, y)
    dparams = {k: device.asarray(v) for k, v in params.items()}
    dloss, dgrads, dstats = model.loss_and_grads(dparams, device.asarray(x), pos, y)
    assert dstats == stats and abs(dloss / loss - 1) < 1e-5
    for k in grads:
        assert device.is_mine(dgrads[k]), k
        g = device.to_host(dgrads[k])
        assert np.linalg.norm(g - grads[k]) <= 1e-5 * np.linalg.norm(grads[k]) + 1e-12, k
