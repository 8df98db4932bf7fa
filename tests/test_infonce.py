"""ops.infonce against infonce_ref (float64), every fast backend, odd shapes, every dtype."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from conftest import fast_backends, poison_allocator
from moco_fast import ops
from moco_fast.ops import _self_check, variants
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


def run(q, k, queue, backend, temperature=T):
    q = q.detach().clone().requires_grad_(True)
    loss, stats = ops.infonce(q, k, queue, temperature, backend=backend, return_stats=True)
    (grad,) = torch.autograd.grad(loss, q)
    return loss, grad, stats


def assert_within_torch_error(ours, exact, native, floor, what):
    """max |ours - exact| <= 2 max |PyTorch in the same dtypes - exact| + floor * max |exact|."""
    err, bound = _self_check.max_error(ours, exact), _self_check.error_bound(exact, native, floor)  # the run-time check's
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g} (2x PyTorch's own error + floor)"


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
    torch.library.opcheck(torch.ops.moco_fast.infonce, (q, k, queue, T, backend, False,
                                                        variants.variant("infonce", backend)))


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


def test_infonce_eager_call_enters_the_custom_op_only_for_autograd(monkeypatch):
    """The eager rule of every op (_backends.skips_dispatch): no gradient to record, no custom-op dispatch."""
    module = importlib.import_module("moco_fast.ops.infonce")  # ops.infonce is the function
    calls = []
    real = module.infonce_op
    monkeypatch.setattr(module, "infonce_op", lambda *args: calls.append(args[4]) or real(*args))
    q, k, queue = make_inputs(3, 8, 20, F32, F32, "cpu")
    with torch.no_grad():
        expected = ops.infonce(q, k, queue, T, backend="reference")
    assert calls == []
    q.requires_grad_(True)
    loss = ops.infonce(q, k, queue, T, backend="reference")
    loss.backward()
    assert calls == ["reference"] and torch.equal(loss, expected) and q.grad is not None


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


# ------------------------------------------------------------------------------------------------
# the path training takes: TF32 ("high", what step.fast_cuda_settings sets) at the training shapes

TRAINING_SHAPES = [pytest.param(256, 128, 65536, id="N256-K65536"), pytest.param(256, 128, 65537, id="N256-K65537"),
                   pytest.param(32, 128, 65536, id="N32-K65536")]


@pytest.fixture
def matmul_precision_high():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("dtype, queue_dtype, floor", [p for p in DTYPES if p.id != "f64"])
@pytest.mark.parametrize("N, C, K", TRAINING_SHAPES)
@pytest.mark.parametrize("device, backend", fast_backends("infonce"))
def test_infonce_tf32_at_training_shapes(device, backend, N, C, K, dtype, queue_dtype, floor, matmul_precision_high):
    """Under "high" the fp32 dots may run in TF32 (Triton's tf32 dots, the CUDA backend's TF32 or bf16 engine);
    the bound is twice the reference's own error under the same setting (cuBLAS in TF32 on a GPU)."""
    if backend == "cpu":
        pytest.skip("no TF32 on the CPU (test_infonce_large_queue runs this backend at K=65,536)")
    if (backend, device) == ("triton", "cpu") and (dtype, queue_dtype, N) != (F32, F32, 32):
        pytest.skip("the Triton interpreter runs the smallest training shape in fp32 (10 s)")
    q, k, queue = make_inputs(N, C, K, dtype, queue_dtype, device)
    exact = run(q.double(), k.double(), queue.double(), "reference")
    native = run(q, k, queue, "reference")
    ours = run(q, k, queue, backend)
    assert_within_torch_error(ours[0], exact[0], native[0], floor, "loss")
    assert_within_torch_error(ours[1], exact[1], native[1], floor, "grad")


def saturated_inputs(device, N=16, C=64, K=300):
    """Each query equal to its key, a random queue: at T=0.05 the positive takes all but ~1e-5 of the softmax."""
    q = F.normalize(torch.randn(N, C, dtype=F64), dim=1)
    queue = F.normalize(torch.randn(K, C, dtype=F64), dim=1)
    return q.to(device, F32), q.to(device, F32), queue.to(device, F32)


@pytest.mark.parametrize("device, backend", fast_backends("infonce") + [pytest.param("cpu", "reference", id="reference")])
def test_infonce_gradient_keeps_its_precision_when_the_positive_saturates(device, backend):
    """Late in training p_0 -> 1: dL/dq = sum_j p_j queue_j - (1 - p_0) k must not be formed as p_0 k + ... - k,
    whose cancellation costs a relative error of ~1e-7 / (1 - p_0) (5e-3 here). PyTorch's own fp32 error is
    of that size (softmax - onehot cancels the same way), so the bound is relative, 1e-5 of max |dL/dq|."""
    q, k, queue = saturated_inputs(device)
    exact_loss, exact_grad, _ = run(q.double(), k.double(), queue.double(), "reference", 0.05)
    assert 1e-6 < exact_loss.item() < 1e-4, exact_loss.item()  # the regime the test is about
    loss, grad, _ = run(q, k, queue, backend, 0.05)
    err = (grad.double() - exact_grad).abs().max().item() / exact_grad.abs().max().item()
    if backend == "reference":  # the bound means something: PyTorch's own cross-entropy misses it
        assert err > 1e-4, err
        return
    assert err < 1e-5, f"relative error of dL/dq {err:.3g}"
    native_loss = run(q, k, queue, "reference", 0.05)[0]
    assert_within_torch_error(loss, exact_loss, native_loss, 1e-6, "loss")


# ------------------------------------------------------------------------------------------------
# every config of the Triton "hopper" variant (the interpreter runs the same program for any config)

def _hopper_module():
    from moco_fast.kernels import infonce_hopper
    return infonce_hopper


def hopper_configs():
    try:
        names = list(_hopper_module().CONFIGS)
    except ImportError:  # no triton: the ids still collect
        names = ["unavailable"]
    return [pytest.param(n, marks=pytest.mark.skipif(n == "unavailable", reason="no triton")) for n in names]


# N=1, C=1 and C=127 (pointer loads), C=24 < BLOCK_C with 96-byte rows (the descriptor path in fp32, its
# column padding), N=130 (1-5 row blocks), K=1, K=300 (tails of 12 and 44 keys), K=257 (a tail of 1 key
# after every block size, as K=4097 has, in a sixteenth of the interpreter's time)
# after every block size, as K=4097 has, in a sixteenth of the interpreter's time). Temperatures: C=1 rows are
# +-1, so at T=0.2 the negatives' weights are e^-10 and dL/dq (~4e-12) is the cancellation of terms of ~1,
# which a kernel streaming over the keys (any summation order, numpy's exp2 in the interpreter) cannot match
# to 2x PyTorch's elementwise softmax-minus-one-hot; at T=1 the gradient is well-conditioned.
HOPPER_SHAPES = [(1, 127, 1, T), (130, 24, 300, T), (3, 1, 257, 1.0)]


@pytest.mark.parametrize("config", hopper_configs())
@pytest.mark.parametrize("device, backend", [p for p in fast_backends("infonce") if p.values[1] == "triton"])
def test_infonce_triton_hopper_config(device, backend, config, monkeypatch):
    """Each named config, forced, against the float64 reference: fp32 for the TF32/ieee configs, fp16 for
    the 16-bit ones (the interpreter has no bf16 dots); forward, gradient, ranks, NaN-poisoned outputs."""
    hop = _hopper_module()
    monkeypatch.setenv("MOCO_FAST_TRITON_INFONCE", "hopper")
    monkeypatch.setenv(variants.HOPPER_CONFIG_ENV, config)
    dtype = F16 if config.startswith("b16") else F32
    for N, C, K, temperature in HOPPER_SHAPES:
        q, k, queue = make_inputs(N, C, K, dtype, dtype, device)
        plan = hop.plan(config, N, C, K, queue, sms=0)
        assert plan["desc"] == (hop.CONFIGS[config].desc and (C * queue.element_size()) % 16 == 0), plan
        exact_loss, exact_grad, exact_stats = run(q.double(), k.double(), queue.double(), "reference", temperature)
        native_loss, native_grad, _ = run(q, k, queue, "reference", temperature)
        poison_allocator(device)
        loss, grad, stats = run(q, k, queue, backend, temperature)
        assert_within_torch_error(loss, exact_loss, native_loss, 1e-6, f"loss {config} {N, C, K}")
        assert_within_torch_error(grad, exact_grad, native_grad, 1e-6, f"grad {config} {N, C, K}")
        if dtype == F32:
            for name in ("acc1", "acc5"):
                assert stats[name].item() == exact_stats[name].item(), (config, name, (N, C, K))


def test_infonce_triton_variant_names(monkeypatch):
    """The default is v1 (until a GPU run confirms hopper); unknown names are errors, never a fallback."""
    pytest.importorskip("triton")
    hop = _hopper_module()
    from moco_fast.kernels import infonce as module
    monkeypatch.delenv("MOCO_FAST_TRITON_INFONCE", raising=False)
    monkeypatch.delenv(variants.HOPPER_CONFIG_ENV, raising=False)
    assert variants.variant("infonce", "triton") == "v1"
    q, k, queue = make_inputs(2, 8, 5, F32, F32, "cpu")
    monkeypatch.setenv("MOCO_FAST_TRITON_INFONCE", "fast")
    with pytest.raises(ValueError, match=r"unknown infonce variant 'fast' for backend 'triton' "
                                         r"\(MOCO_FAST_TRITON_INFONCE\)"):
        ops.infonce(q, k, queue, T, backend="triton")
    with pytest.raises(ValueError, match=r"unknown Triton variant 'fast'"):
        module.infonce_fwd(q, k, queue, 1 / T, False, "fast")
    monkeypatch.setenv("MOCO_FAST_TRITON_INFONCE", "hopper")
    monkeypatch.setenv(variants.HOPPER_CONFIG_ENV, "n999")
    assert variants.variant("infonce", "triton") == "hopper:n999"
    with pytest.raises(ValueError, match=r"unknown Triton config 'n999'"):
        module.infonce_fwd(q, k, queue, 1 / T, False, "hopper:n999")
    assert set(hop.DEFAULTS.values()) <= set(hop.CONFIGS)
    assert all(hop.configs_for(f) for f in ("tf32", "ieee", "b16"))


def test_infonce_triton_hopper_tuning_skips_wrong_configs_and_logs_its_choice(monkeypatch, caplog):
    """The tuner's logic with fake launches (timing needs a GPU): a config whose result disagrees with v1,
    or that fails to run, never wins; the fastest of the rest does, and is logged."""
    hop = _hopper_module()
    names = hop.configs_for("tf32")
    fake_us = {n: 10.0 + i for i, n in enumerate(names)}
    wrong, broken = names[0], names[1]  # the two fastest
    ref = (torch.tensor(1.0), torch.ones(4, 8), torch.zeros(2))

    def run_cfg(cfg):
        if cfg["name"] == broken:
            raise RuntimeError("out of resources: shared memory")
        grad = ref[1] * (1.5 if cfg["name"] == wrong else 1.0 + 1e-4)
        return ref[0], grad, ref[2]

    current = {}
    real_plan = hop.plan

    def plan(name, *args):
        current["name"] = name
        return real_plan(name, *args)

    def do_bench(fn, **kw):
        fn()
        return fake_us[current["name"]] / 1e3  # milliseconds, as Triton's

    monkeypatch.setattr(hop, "plan", plan)
    monkeypatch.setattr(hop.triton.testing, "do_bench", do_bench)
    queue = torch.randn(64, 8)
    with caplog.at_level("INFO", logger="moco_fast"):
        best = hop._tune("key", "tf32", 4, 8, 64, queue, 132, run_cfg, lambda: ref)
    assert best == names[2], best
    assert f"picked {names[2]}" in caplog.text and f"config {wrong} disagrees" in caplog.text
    assert f"config {broken} failed" in caplog.text


# (backend, switch, variant, fp32 matmul precision): the cuda v2 engine serves TF32 (v1's FMA engine serves "highest")
VARIANTS = [("triton", "MOCO_FAST_TRITON_INFONCE", "hopper", "highest"), ("cuda", "MOCO_FAST_CUDA_INFONCE", "v2", "high")]


def variant_params():
    return [pytest.param(*p.values, switch, variant, precision, marks=p.marks, id=f"{p.id}-{variant}")
            for p in fast_backends("infonce") for backend, switch, variant, precision in VARIANTS
            if p.values[1] == backend]


@pytest.mark.parametrize("device, backend, switch, variant, precision", variant_params())
def test_infonce_variant_opcheck_and_compile(device, backend, switch, variant, precision, monkeypatch):
    """A new variant behind the same custom op: opcheck, and a fullgraph compile equal to eager."""
    monkeypatch.setenv(switch, variant)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        q, k, queue = make_inputs(6, 32, 100, F32, F32, device)
        torch.library.opcheck(torch.ops.moco_fast.infonce, (q.clone().requires_grad_(True), k, queue, T, backend, True,
                                                            variants.variant("infonce", backend)))
        compiled = torch.compile(lambda q: ops.infonce(q, k, queue, T, backend=backend), fullgraph=True)
        qc = q.clone().requires_grad_(True)
        loss = compiled(qc)
        loss.backward()
        eager_loss, eager_grad, _ = run(q, k, queue, backend)
    finally:
        torch.set_float32_matmul_precision(before)
    assert torch.equal(loss, eager_loss) and torch.equal(qc.grad, eager_grad)


# ------------------------------------------------------------------------------------------------
# the CUDA backend's variants (MOCO_FAST_CUDA_INFONCE, csrc/cuda/infonce.cu); the tests above run the default, v1

CUDA_VARIANTS = [pytest.param(v, id=f"cuda_{v}") for v in ("v1", "v2")]
# v2's tiles: 128 rows x 64 keys, C padded to 128. C=1, 3, 127 (converted rows), 64 and 128 (raw copies),
# N=130 (two row blocks, a partial warp), K=1, 65 and 4097 (one key after full tiles), K=65537 (~16 tiles
# per CTA: the ring wraps); C=200 runs v1's kernel under v2
CUDA_VARIANT_SHAPES = [(1, 127, 1), (1, 1, 4097), (7, 127, 4097), (33, 128, 1000), (5, 3, 130), (130, 64, 65),
                       (3, 200, 300), (256, 128, 65537)]


def ambiguous_ranks(q, k, queue, temperature, delta=0.1):
    """Rows whose positive logit lies within delta of the largest (acc1) or the 5th largest (acc5) negative:
    ranks that TF32 or 16-bit rounding may flip."""
    q, k, queue = q.double(), k.double(), queue.double()
    pos, neg = (q * k).sum(1) / temperature, q @ queue.T / temperature
    top = neg.topk(min(5, neg.shape[1]), dim=1).values
    near5 = (top[:, 4] - pos).abs() < delta if top.shape[1] == 5 else torch.zeros_like(pos, dtype=torch.bool)
    return int(((top[:, 0] - pos).abs() < delta).sum()), int(near5.sum())


@pytest.mark.parametrize("precision", ["highest", "high"])
@pytest.mark.parametrize("dtype, queue_dtype, floor", [p for p in DTYPES if p.id != "f64"])
@pytest.mark.parametrize("variant", CUDA_VARIANTS)
@pytest.mark.parametrize("device, backend", [p for p in fast_backends("infonce") if p.values[1] == "cuda"])
def test_infonce_cuda_variant(device, backend, variant, dtype, queue_dtype, floor, precision, monkeypatch):
    """Each variant, forced, against the float64 reference: loss and gradient within twice PyTorch's own error
    under the same matmul precision, ranks up to those rounding may flip, NaN-poisoned outputs, bitwise
    repeatable."""
    monkeypatch.setenv("MOCO_FAST_CUDA_INFONCE", variant)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        for N, C, K in CUDA_VARIANT_SHAPES:
            q, k, queue = make_inputs(N, C, K, dtype, queue_dtype, device)
            exact_loss, exact_grad, exact_stats = run(q.double(), k.double(), queue.double(), "reference")
            native_loss, native_grad, _ = run(q, k, queue, "reference")
            poison_allocator(device)
            loss, grad, stats = run(q, k, queue, backend)
            assert_within_torch_error(loss, exact_loss, native_loss, floor, f"loss {variant} {N, C, K}")
            assert_within_torch_error(grad, exact_grad, native_grad, floor, f"grad {variant} {N, C, K}")
            for name, flips in zip(("acc1", "acc5"), ambiguous_ranks(q, k, queue, T)):
                assert abs(stats[name].item() - exact_stats[name].item()) * N <= flips + 1e-6, (name, (N, C, K))
            again = run(q, k, queue, backend)
            assert torch.equal(loss, again[0]) and torch.equal(grad, again[1]), (variant, (N, C, K))
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("device, backend", [p for p in fast_backends("infonce") if p.values[1] == "cuda"])
def test_infonce_cuda_variant_names(device, backend, monkeypatch):
    """An unknown variant is an error naming the switch (or, passed to the launcher, the name), never a fallback."""
    q, k, queue = make_inputs(2, 8, 5, F32, F32, device)
    with pytest.raises(RuntimeError, match=r"unknown CUDA variant 'v3'"):
        torch.ops.moco_fast.infonce_kernel(q, k, queue, 1 / T, False, "v3")
    monkeypatch.setenv("MOCO_FAST_CUDA_INFONCE", "v3")
    with pytest.raises(ValueError, match=r"unknown infonce variant 'v3' for backend 'cuda' \(MOCO_FAST_CUDA_INFONCE\)"):
        ops.infonce(q, k, queue, T, backend=backend)


