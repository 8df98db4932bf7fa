"""ops.infonce against infonce_ref (float64), every fast backend, odd shapes, every dtype."""
import pytest
import torch
import torch.nn.functional as F

from conftest import fast_backends, poison_allocator
from moco_fast import ops
from moco_fast.ops import _custom
from moco_fast.reference import infonce_ref

T = 0.07
# (N, C, K): N=1, C=1, C=127, K=1, K=4097 and K not a multiple of any block or of N
SHAPES = [(1, 127, 1), (1, 1, 4097), (7, 127, 4097), (33, 128, 1000), (5, 3, 130)]
SMALL_SHAPES = [(1, 127, 1), (1, 1, 300), (7, 127, 257), (33, 64, 200)]  # for the Triton interpreter
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
# (q and k dtype, queue dtype, relative floor added to 2x PyTorch's own error: a few ulps of the
# accumulation dtype, for where PyTorch happens to round luckily; 0 where PyTorch computes in 16 bits)
DTYPES = [
    pytest.param(F64, F64, 1e-12, id="f64"),
    pytest.param(F32, F32, 1e-6, id="f32"),
    pytest.param(BF16, BF16, 0.0, id="bf16"),
    pytest.param(F16, F16, 0.0, id="f16"),
    pytest.param(F32, BF16, 1e-6, id="f32-queue_bf16"),
    pytest.param(F16, F32, 1e-6, id="f16-queue_f32"),
]


def make_inputs(N, C, K, dtype, queue_dtype, device):
    """Normalised rows; positives near their queries so the ranks (acc1/acc5) vary."""
    q = F.normalize(torch.randn(N, C, dtype=F64), dim=1)
    k = F.normalize(q + torch.rand(N, 1, dtype=F64) * 1.5 * torch.randn(N, C, dtype=F64), dim=1)
    queue = F.normalize(torch.randn(K, C, dtype=F64), dim=1)
    return q.to(device, dtype), k.to(device, dtype), queue.to(device, queue_dtype)


def run(q, k, queue, backend):
    q = q.detach().clone().requires_grad_(True)
    loss, stats = ops.infonce(q, k, queue, T, backend=backend, return_stats=True)
    (grad,) = torch.autograd.grad(loss, q)
    return loss, grad, stats


def assert_within_torch_error(ours, exact, native, floor, what):
    """max |ours - exact| <= 2 max |PyTorch in the same dtypes - exact| + floor * max |exact|."""
    err = (ours.double() - exact).abs().max().item()
    torch_err = (native.double() - exact).abs().max().item()
    assert err <= 2 * torch_err + floor * exact.abs().max().item(), f"{what}: error {err:.3g} vs PyTorch's own {torch_err:.3g}"


@pytest.mark.parametrize("dtype, queue_dtype, floor", DTYPES)
@pytest.mark.parametrize("device, backend", fast_backends("infonce"))
def test_infonce_matches_reference(device, backend, dtype, queue_dtype, floor):
    if backend == "triton" and device == "cpu" and (F64 in (dtype, queue_dtype) or BF16 in (dtype, queue_dtype)):
        pytest.skip("the Triton interpreter covers fp32 and fp16")
    if backend != "cpu" and F64 in (dtype, queue_dtype):
        pytest.skip("fp64 runs on the reference and cpu backends only")
    shapes = SMALL_SHAPES if (backend, device) == ("triton", "cpu") else SHAPES
    for N, C, K in shapes:
        q, k, queue = make_inputs(N, C, K, dtype, queue_dtype, device)
        exact_loss, exact_grad, exact_stats = run(q.double(), k.double(), queue.double(), "reference")
        native_loss, native_grad, _ = run(q, k, queue, "reference")
        poison_allocator(device)
        loss, grad, stats = run(q, k, queue, backend)
        assert loss.dtype == (F64 if F64 in (dtype, queue_dtype) else F32) and loss.shape == ()
        assert grad.dtype == q.dtype and grad.shape == q.shape
        assert_within_torch_error(loss, exact_loss, native_loss, floor, f"loss {N, C, K}")
        assert_within_torch_error(grad, exact_grad, native_grad, floor, f"grad {N, C, K}")
        if dtype in (F32, F64) and queue_dtype in (F32, F64):
            for name in ("acc1", "acc5"):  # ranks are exact away from ties
                assert stats[name].item() == exact_stats[name].item(), (name, (N, C, K))


@pytest.mark.parametrize("device, backend", fast_backends("infonce"))
def test_infonce_large_queue(device, backend):
    """The size of the official recipe (K=65,536) streams through many chunks and splits."""
    if (backend, device) == ("triton", "cpu"):
        pytest.skip("too large for the Triton interpreter")
    q, k, queue = make_inputs(64, 128, 65536, F32, F32, device)
    exact = run(q.double(), k.double(), queue.double(), "reference")
    native = run(q, k, queue, "reference")
    ours = run(q, k, queue, backend)
    assert_within_torch_error(ours[0], exact[0], native[0], 1e-6, "loss")
    assert_within_torch_error(ours[1], exact[1], native[1], 1e-6, "grad")


@pytest.mark.parametrize("device, backend", fast_backends("infonce"))
def test_infonce_deterministic(device, backend):
    q, k, queue = make_inputs(9, 127, 3001, F32, F32, device)
    first, second = run(q, k, queue, backend), run(q, k, queue, backend)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("device, backend", fast_backends("infonce") + [pytest.param("cpu", "reference", id="reference")])
def test_infonce_queue_mutated_after_forward(device, backend):
    """dL/dq is fixed in the forward: overwriting the queue before backward changes nothing."""
    q, k, queue = make_inputs(5, 64, 700, F32, F32, device)
    _, expected, _ = run(q, k, queue, backend)
    q = q.detach().clone().requires_grad_(True)
    loss = ops.infonce(q, k, queue, T, backend=backend)
    queue.copy_(torch.randn_like(queue))
    loss.backward()
    assert torch.equal(q.grad, expected)


@pytest.mark.parametrize("device, backend", fast_backends("infonce") + [pytest.param("cpu", "reference", id="reference")])
def test_infonce_opcheck(device, backend):
    q, k, queue = make_inputs(3, 16, 50, F32, F32, device)
    q.requires_grad_(True)
    torch.library.opcheck(_custom.infonce_op, (q, k, queue, T, backend, False))


@pytest.mark.parametrize("device, backend", fast_backends("infonce"))
def test_infonce_compiles_fullgraph(device, backend):
    q, k, queue = make_inputs(6, 32, 100, F32, F32, device)
    compiled = torch.compile(lambda q: ops.infonce(q, k, queue, T, backend=backend, return_stats=True),
                             fullgraph=True)
    qc = q.clone().requires_grad_(True)
    loss, stats = compiled(qc)
    loss.backward()
    eager_loss, eager_grad, eager_stats = run(q, k, queue, backend)
    assert torch.equal(loss, eager_loss) and torch.equal(qc.grad, eager_grad)
    assert stats["acc5"].item() == eager_stats["acc5"].item()


def test_infonce_ref_is_the_official_cross_entropy():
    """The spec itself: cross-entropy over [l_pos, l_neg] / T with label 0, checked by hand."""
    q, k, queue = make_inputs(4, 8, 10, F64, F64, "cpu")
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / T
    expected = (torch.logsumexp(logits, 1) - logits[:, 0]).mean()
    torch.testing.assert_close(infonce_ref(q, k, queue, T), expected)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_infonce_errors(backend):
    q, k, queue = make_inputs(4, 8, 10, F32, F32, "cpu")
    with pytest.raises(ValueError, match=r"k must have the shape of q, \(4, 8\); got \(3, 8\)"):
        ops.infonce(q, k[:3], queue, T, backend=backend)
    with pytest.raises(ValueError, match=r"queue must be \(K, 8\).*got \(10, 7\)"):
        ops.infonce(q, k, queue[:, :7].contiguous(), T, backend=backend)
    with pytest.raises(ValueError, match=r"q must have dtype in .*got torch.int64"):
        ops.infonce(q.long(), k, queue, T, backend=backend)
    with pytest.raises(ValueError, match=r"queue must be on cpu like the other inputs; got meta"):
        ops.infonce(q, k, queue.to("meta"), T, backend=backend)
    with pytest.raises(ValueError, match=r"queue must be contiguous; got shape \(5, 8\) with strides \(16, 1\)"):
        ops.infonce(q, k, queue.repeat(1, 1)[::2], T, backend=backend)
    with pytest.raises(ValueError, match=r"temperature must be a positive finite float; got 0.0"):
        ops.infonce(q, k, queue, 0.0, backend=backend)
