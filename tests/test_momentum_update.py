"""ops.momentum_update_ against momentum_update_ref_, every fast backend, odd sizes and dtypes."""
import pytest
import torch
import torchvision

from conftest import fast_backends
from moco_fast import ops
from moco_fast.ops import variants
from moco_fast.ops.momentum_update import kernel
from moco_fast.reference import momentum_update_ref_

SIZES = [(1,), (7,), (0,), (1000,), (3, 5, 7), (4099,), (65536 + 3,)]


def make_pairs(sizes, dtype, device):
    params_k = [torch.randn(s, dtype=dtype, device=device) for s in sizes]
    params_q = [torch.randn(s, dtype=dtype, device=device) for s in sizes]
    return params_k, params_q


@pytest.fixture(params=["v1", "v2"])
def triton_ema(request, monkeypatch):
    """Each Triton EMA variant (MOCO_FAST_TRITON_EMA); the other backends ignore it."""
    monkeypatch.setenv("MOCO_FAST_TRITON_EMA", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["f32", "bf16", "f16", "f64"])
@pytest.mark.parametrize("m_kind", ["float", "tensor"])
@pytest.mark.parametrize("device, backend", fast_backends("momentum_update"))
def test_momentum_update_matches_reference(device, backend, dtype, m_kind, triton_ema):
    if triton_ema != "v1" and backend != "triton":
        pytest.skip("variants are the Triton backend's")
    if dtype == torch.float64 and backend != "cpu":
        pytest.skip("fp64 parameters run on the reference and cpu backends")
    if dtype == torch.bfloat16 and (backend, device) == ("triton", "cpu"):
        pytest.skip("the Triton interpreter has no bf16")
    params_k, params_q = make_pairs(SIZES, dtype, device)
    expected = [p.clone() for p in params_k]
    m = 0.999 if m_kind == "float" else torch.tensor([0.999], device=device)
    momentum_update_ref_(expected, params_q, float(m))  # a tensor holds 0.999 rounded to fp32
    ops.momentum_update_(params_k, params_q, m, backend=backend)
    for got, want in zip(params_k, expected):
        # the same two roundings in the same dtype: bitwise equal
        assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("device, backend", fast_backends("momentum_update"))
def test_momentum_update_resnet50_and_mixed_dtypes(device, backend):
    """A ResNet-50's 161 tensors in one call, then fp32 and fp16 pairs mixed in one list."""
    if (backend, device) == ("triton", "cpu"):
        pytest.skip("too large for the Triton interpreter")
    q = list(torchvision.models.resnet50().to(device).parameters())
    k = [torch.randn_like(p) for p in q]
    expected = [p.clone() for p in k]
    momentum_update_ref_(expected, q, 0.99)
    ops.momentum_update_(k, [p.detach() for p in q], 0.99, backend=backend)
    assert len(k) == 161 and all(torch.equal(a, b) for a, b in zip(k, expected))
    k32, q32 = make_pairs([(5,), (300,)], torch.float32, device)
    k16, q16 = make_pairs([(9,), (70,)], torch.float16, device)
    mixed_k, mixed_q = [k32[0], k16[0], k32[1], k16[1]], [q32[0], q16[0], q32[1], q16[1]]
    expected = [p.clone() for p in mixed_k]
    momentum_update_ref_(expected, mixed_q, 0.5)
    ops.momentum_update_(mixed_k, mixed_q, 0.5, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(mixed_k, expected))


@pytest.mark.parametrize("device, backend", [p for p in fast_backends("momentum_update") if p.values[1] == "triton"])
def test_momentum_update_triton_misaligned_and_block_edges(device, backend, triton_ema):
    """Views 4 bytes past an aligned address (v2 must drop its alignment hint) and sizes at a block's edges."""
    block = 4096
    sizes = [block - 1, block, block + 1, 2 * block]
    base_k = [torch.randn(n + 1, device=device) for n in sizes]
    base_q = [torch.randn(n + 1, device=device) for n in sizes]
    for off in (0, 1):
        params_k = [b[off:off + n] for b, n in zip(base_k, sizes)]
        params_q = [b[off:off + n] for b, n in zip(base_q, sizes)]
        before = [b.clone() for b in base_k]
        expected = [p.clone() for p in params_k]
        momentum_update_ref_(expected, params_q, 0.9)
        kernel(backend)(params_k, params_q, None, 0.9, variants.variant("momentum_update", backend))
        for got, want, b, old, n in zip(params_k, expected, base_k, before, sizes):
            assert torch.equal(got, want), (off, n)
            rest = torch.ones(n + 1, dtype=torch.bool)
            rest[off:off + n] = False
            assert torch.equal(b[rest], old[rest]), ("wrote outside the tensor", off, n)


def test_momentum_update_triton_unknown_variant(monkeypatch):
    pytest.importorskip("triton")
    from moco_fast.kernels.momentum_update import momentum_update_
    with pytest.raises(ValueError, match=r"unknown Triton variant 'v9'"):
        momentum_update_([torch.zeros(1)], [torch.zeros(1)], None, 0.9, "v9")
    monkeypatch.setenv("MOCO_FAST_TRITON_EMA", "v9")
    with pytest.raises(ValueError, match=r"unknown momentum_update variant 'v9' for backend 'triton' "
                                         r"\(MOCO_FAST_TRITON_EMA\)"):
        ops.momentum_update_([torch.zeros(1)], [torch.zeros(1)], 0.9, backend="triton")


@pytest.mark.parametrize("device, backend", fast_backends("momentum_update"))
def test_momentum_update_channels_last(device, backend):
    """Dense non-contiguous tensors (a channels_last conv weight) are updated in their own layout."""
    k = torch.randn(8, 3, 5, 5, device=device).to(memory_format=torch.channels_last)
    q = torch.randn(8, 3, 5, 5, device=device).to(memory_format=torch.channels_last)
    expected = k.clone()
    momentum_update_ref_([expected], [q], 0.9)
    ops.momentum_update_([k], [q], 0.9, backend=backend)
    assert torch.equal(k, expected)


@pytest.mark.parametrize("device, backend", fast_backends("momentum_update") + [pytest.param("cpu", "reference", id="reference")])
def test_momentum_update_opcheck_and_compile(device, backend):
    params_k, params_q = make_pairs([(5,), (3, 4)], torch.float32, device)
    m = torch.tensor([0.9], device=device)
    name = variants.variant("momentum_update", backend)
    torch.library.opcheck(torch.ops.moco_fast.momentum_update_, ([p.clone() for p in params_k], params_q, m, 0.0, backend,
                                                                 name))
    torch.library.opcheck(torch.ops.moco_fast.momentum_update_, ([p.clone() for p in params_k], params_q, None, 0.9,
                                                                 backend, name))
    compiled = torch.compile(lambda pk, pq, m: ops.momentum_update_(pk, pq, m, backend=backend), fullgraph=True)
    expected = [p.clone() for p in params_k]
    for value in (0.9, 0.5):  # a new momentum value needs no recompilation: it is data
        m.fill_(value)
        momentum_update_ref_(expected, params_q, float(m))
        compiled(params_k, params_q, m)
        assert all(torch.equal(a, b) for a, b in zip(params_k, expected))


def test_momentum_update_errors():
    k, q = make_pairs([(4,), (6,)], torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"params_k and params_q must have the same length; got 2 and 1"):
        ops.momentum_update_(k, q[:1], 0.9)
    with pytest.raises(ValueError, match=r"params_k\[1\] has shape \(6,\) but params_q\[1\] has \(5,\)"):
        ops.momentum_update_(k, [q[0], q[1][:5]], 0.9)
    with pytest.raises(ValueError, match=r"params_q\[0\] must have dtype in \['torch.float32'\]; got torch.float16"):
        ops.momentum_update_(k, [q[0].half(), q[1]], 0.9)
    with pytest.raises(ValueError, match=r"params_q\[0\] must be on cpu like the other inputs; got meta"):
        ops.momentum_update_(k, [q[0].to("meta"), q[1]], 0.9)
    with pytest.raises(ValueError, match=r"must be dense with equal strides; got strides \(2,\) and \(2,\)"):
        ops.momentum_update_([k[1][::2]], [q[1][::2]], 0.9)
    with pytest.raises(ValueError, match=r"m must be a float in \[0, 1\] or a one-element tensor; got 1.5"):
        ops.momentum_update_(k, q, 1.5)
    with pytest.raises(ValueError, match=r"m as a tensor must be one floating-point element on cpu; got shape \(2,\)"):
        ops.momentum_update_(k, q, torch.tensor([0.9, 0.9]))


def test_validation_is_cached_per_list_but_sees_replaced_tensors():
    """The 161-pair check runs once per list of tensors; a list whose tensors changed is checked again."""
    params_k = [torch.randn(5), torch.randn(3, 4)]
    params_q = [torch.randn(5), torch.randn(3, 4)]
    ops.momentum_update_(params_k, params_q, 0.9, backend="reference")
    params_k[1].data = params_k[1].data.half()  # as model.half() does: same object, new storage and dtype
    with pytest.raises(ValueError, match=r"params_q\[1\] must have dtype in \['torch.float16'\]"):
        ops.momentum_update_(params_k, params_q, 0.9, backend="reference")
    ops.momentum_update_(params_k[:1], params_q[:1], 0.9, backend="reference")
    del params_k, params_q  # new tensors may take the old ids and addresses: weakrefs tell them apart
    params_k, params_q = [torch.randn(5), torch.randn(3, 4)], [torch.randn(5), torch.randn(4, 3)]
    with pytest.raises(ValueError, match=r"params_k\[1\] has shape \(3, 4\) but params_q\[1\] has \(4, 3\)"):
        ops.momentum_update_(params_k, params_q, 0.9, backend="reference")
