"""The whole training step as one CUDA graph (moco_fast.step.TrainStep), and the EMA and enqueue ops
captured and replayed with a new momentum and pointer.

On the CPU: the static-buffer path (inputs copied into fixed buffers, learning rate and momentum as
device tensors written in place) repeats the eager step exactly, and the errors. On a GPU (gpu_check.sh):
the captured step against the uncaptured one, and a clear error for a step that syncs."""
import pytest
import torch
import torch.nn as nn

from moco_fast import ops
from moco_fast.config import parse_config
from moco_fast.encoders import get_encoder
from moco_fast.model import MoCo
from moco_fast.reference import enqueue_ref_, momentum_update_ref_
from moco_fast.step import GraphCaptureError, TrainStep, check_capturable, optimizer_state, set_learning_rate



def on_gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")(test))


def make_step(device, seed=0, backend="auto", **kwargs):
    torch.manual_seed(seed)
    model = MoCo(get_encoder("small_resnet"), dim=16, K=40, m=0.99, T=0.2, bn_splits=2, backend=backend)
    model = model.to(device).to(memory_format=torch.channels_last)
    fused = device.type == "cuda"
    opt = torch.optim.SGD(model.encoder_q.parameters(), 0.05, momentum=0.9, weight_decay=5e-4,
                          foreach=not fused, fused=fused or None)
    return model, opt, TrainStep(model, opt, device, bf16=False, **kwargs)


def run_steps(device, model, opt, step, batches):
    out = []
    for i, (im_q, im_k) in enumerate(batches):
        if i == 3:
            set_learning_rate(opt, 0.01)  # an epoch boundary of the schedule
        if i == 4:
            model.set_momentum(0.5)
        torch.manual_seed(100 + i)  # the key shuffle draws from the global generator
        out.append(step(im_q.to(device), im_k.to(device)))
    return (torch.stack(out).cpu(), [p.detach().cpu() for p in model.parameters()], model.queue.cpu(),
            model.queue_ptr.cpu())


def batches(n=7, size=16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last),
             torch.randn(8, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last))
            for _ in range(n)]


def test_static_buffer_step_repeats_the_eager_step_exactly():
    cpu, data = torch.device("cpu"), batches()
    eager = run_steps(cpu, *make_step(cpu), data)
    model, opt, step = make_step(cpu, cuda_graph=True, warmup=2, capture=False)
    lr = opt.param_groups[0]["lr"]
    static = run_steps(cpu, model, opt, step, data)
    assert step.static is not None and step.calls == len(data)  # the static buffers were used
    assert opt.param_groups[0]["lr"] is lr and float(lr) == 0.01  # written in place, where a graph reads it
    assert torch.equal(eager[0], static[0])
    assert all(torch.equal(a, b) for a, b in zip(eager[1], static[1])) and torch.equal(eager[2], static[2])
    assert optimizer_state(opt)["param_groups"][0]["lr"] == pytest.approx(0.01)
    assert isinstance(optimizer_state(opt)["param_groups"][0]["lr"], float)  # checkpoints hold floats


def test_cuda_graph_errors_on_the_cpu(capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse's error, before anything is read or built
        parse_config(["/data", "--cuda-graph", "--device", "cpu"])
    assert exit_.value.code == 2 and "--cuda-graph needs a CUDA device" in capsys.readouterr().err
    model, _, _ = make_step(torch.device("cpu"))
    with pytest.raises(GraphCaptureError, match="needs a CUDA device; this run is on cpu"):
        check_capturable(model, torch.device("cpu"))


@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
@on_gpu
def test_captured_step_matches_the_uncaptured_step(backend):
    cuda, data = torch.device("cuda"), batches(9)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    eager = run_steps(cuda, *make_step(cuda, backend=backend), data)
    model, opt, step = make_step(cuda, backend=backend, cuda_graph=True, warmup=2)
    graphed = run_steps(cuda, model, opt, step, data)
    assert step.graph is not None
    torch.testing.assert_close(graphed[0], eager[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(graphed[1], eager[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(graphed[2], eager[2], rtol=1e-4, atol=1e-5)


def assert_steps_close(ours, expected, tol):
    """Losses, parameters and queue within tol (relative and absolute), the pointer equal."""
    torch.testing.assert_close(ours[0], expected[0], rtol=tol, atol=tol)
    for a, b in zip(ours[1], expected[1]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    torch.testing.assert_close(ours[2], expected[2], rtol=tol, atol=tol)
    assert torch.equal(ours[3], expected[3])


# Two correct InfoNCE kernels differ by fp32 roundings (~1e-7), which 9 SGD steps through BatchNorm on 8
# samples could amplify. Measured on the CPU, cpu against reference backend, eager, the same data
# (2026-12-02): losses 4.8e-7, parameters 2.4e-7, queue 6.4e-7 apart after 9 steps. The GPU bound leaves
# room for cuDNN and cuBLAS roundings on top.
ACROSS_BACKENDS = 1e-4


def test_cpu_backend_steps_stay_near_the_reference_steps():
    """Calibrates ACROSS_BACKENDS where it can run: two backends, 9 eager steps, the same data."""
    cpu, data = torch.device("cpu"), batches(9)
    reference = run_steps(cpu, *make_step(cpu, backend="reference"), data)
    ours = run_steps(cpu, *make_step(cpu, backend="auto"), data)
    assert_steps_close(ours, reference, ACROSS_BACKENDS / 10)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@on_gpu
def test_captured_fast_step_matches_the_uncaptured_reference_step(backend):
    """The captured step with a fast backend against the plain step with the reference ops: 9 steps."""
    cuda, data = torch.device("cuda"), batches(9)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    reference = run_steps(cuda, *make_step(cuda, backend="reference"), data)
    model, opt, step = make_step(cuda, backend=backend, cuda_graph=True, warmup=2)
    graphed = run_steps(cuda, model, opt, step, data)
    assert step.graph is not None
    assert_steps_close(graphed, reference, ACROSS_BACKENDS)


@on_gpu
def test_a_step_that_syncs_is_a_clear_error():
    cuda = torch.device("cuda")
    model, _, _ = make_step(cuda, backend="reference")
    with pytest.raises(GraphCaptureError, match="reads the queue pointer on the host"):
        check_capturable(model, cuda)

    class Syncing(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = make_step(cuda)[0]

        def forward(self, im_q, im_k):
            loss, stats = self.inner(im_q, im_k)
            if loss.item() > 1e9:  # a host read in the step
                loss = loss * 0
            return loss, stats
    wrapper = Syncing()
    opt = torch.optim.SGD(wrapper.inner.encoder_q.parameters(), 0.05, momentum=0.9, fused=True)
    step = TrainStep(wrapper, opt, cuda, bf16=False, cuda_graph=True, warmup=1)
    im = torch.randn(8, 3, 16, 16, device=cuda)
    step(im, im)
    with pytest.raises(GraphCaptureError, match="could not be captured in one CUDA graph"):
        step(im, im)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@on_gpu
def test_momentum_update_and_enqueue_replay_in_a_cuda_graph(backend):
    dev = "cuda"
    params_k = [torch.randn(s, device=dev) for s in [(5,), (1000,), (3, 7), (0,), (4099,)]]
    params_q = [torch.randn_like(p) for p in params_k]
    m = torch.tensor([0.9], device=dev, dtype=torch.float64)
    queue, ptr = torch.zeros(10, 4, device=dev), torch.zeros(1, dtype=torch.long, device=dev)
    keys = torch.randn(3, 4, device=dev)

    def step():
        ops.momentum_update_(params_k, params_q, m, backend=backend)
        ops.enqueue_(queue, ptr, keys, backend=backend)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: builds the cached device table before capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for momentum, pointer in [(0.5, 8), (0.99, 2), (0.0, 9)]:
        m.fill_(momentum)
        ptr.fill_(pointer)
        keys.copy_(torch.randn_like(keys))
        expected_k, expected_queue, expected_ptr = [p.clone() for p in params_k], queue.clone(), ptr.clone()
        momentum_update_ref_(expected_k, params_q, momentum)
        enqueue_ref_(expected_queue, expected_ptr, keys)
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(params_k, expected_k)), momentum
        assert torch.equal(queue, expected_queue) and torch.equal(ptr, expected_ptr), pointer
