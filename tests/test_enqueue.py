"""ops.enqueue_ against enqueue_ref_: wrap-around, B > K, dtype casts, the pointer on the device."""
import pytest
import torch

from conftest import fast_backends
from moco_fast import ops
from moco_fast.reference import enqueue_ref_

# (K, C, start pointer, batch sizes of successive calls)
CASES = [
    pytest.param(8, 4, 0, [2, 2, 2, 2, 2], id="wrap-exact"),
    pytest.param(10, 3, 7, [4, 1, 6], id="wrap-split"),
    pytest.param(5, 3, 2, [12, 5, 3], id="B>K-and-B==K"),
    pytest.param(1, 7, 0, [1, 3], id="K=1"),
    pytest.param(4097, 127, 4000, [256, 300], id="K=4097-C=127"),
    pytest.param(6, 2, 3, [0, 2], id="B=0"),
]


@pytest.mark.parametrize("queue_dtype, keys_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                     (torch.float16, torch.float32), (torch.float32, torch.float16)],
                         ids=["f32", "bf16<-f32", "f16<-f32", "f32<-f16"])
@pytest.mark.parametrize("K, C, start, batches", CASES)
@pytest.mark.parametrize("device, backend", fast_backends("enqueue"))
def test_enqueue_matches_reference(device, backend, K, C, start, batches, queue_dtype, keys_dtype):
    if (backend, device) == ("triton", "cpu") and torch.bfloat16 in (queue_dtype, keys_dtype):
        pytest.skip("the Triton interpreter has no bf16")
    queue = torch.full((K, C), float("nan"), dtype=queue_dtype, device=device)  # poisoned
    ptr = torch.tensor([start], device=device)
    expected, expected_ptr = queue.clone(), ptr.clone()
    for B in batches:
        keys = torch.randn(B, C, dtype=keys_dtype, device=device)
        enqueue_ref_(expected, expected_ptr, keys)
        ops.enqueue_(queue, ptr, keys, backend=backend)
        assert torch.equal(ptr, expected_ptr)
        assert torch.equal(queue.isnan(), expected.isnan()) and torch.equal(queue.nan_to_num(), expected.nan_to_num())
    assert ptr.dtype == torch.int64 and ptr.shape == (1,) and ptr.device == queue.device


@pytest.mark.parametrize("device, backend", fast_backends("enqueue") + [pytest.param("cpu", "reference", id="reference")])
def test_enqueue_opcheck_and_compile(device, backend):
    queue, ptr, keys = torch.zeros(9, 4, device=device), torch.tensor([7], device=device), torch.randn(3, 4, device=device)
    torch.library.opcheck(torch.ops.moco_fast.enqueue_, (queue.clone(), ptr.clone(), keys, backend))
    compiled = torch.compile(lambda q, p, k: ops.enqueue_(q, p, k, backend=backend), fullgraph=True)
    expected, expected_ptr = queue.clone(), ptr.clone()
    for _ in range(4):
        keys = torch.randn(3, 4, device=device)
        enqueue_ref_(expected, expected_ptr, keys)
        compiled(queue, ptr, keys)
    assert torch.equal(queue, expected) and torch.equal(ptr, expected_ptr)


def test_enqueue_errors():
    queue, ptr, keys = torch.zeros(8, 4), torch.zeros(1, dtype=torch.long), torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"keys must be \(B, 4\) like the queue's rows; got \(2, 5\)"):
        ops.enqueue_(queue, ptr, torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"ptr must have dtype in \['torch.int64'\]; got torch.int32"):
        ops.enqueue_(queue, ptr.int(), keys)
    with pytest.raises(ValueError, match=r"ptr must have shape \(1,\); got \(\)"):
        ops.enqueue_(queue, ptr[0], keys)
    with pytest.raises(ValueError, match=r"keys must be on cpu like the other inputs; got meta"):
        ops.enqueue_(queue, ptr, keys.to("meta"))
    with pytest.raises(ValueError, match=r"queue must be contiguous; got shape \(8, 2\) with strides \(4, 2\)"):
        ops.enqueue_(queue[:, ::2], ptr, keys[:, :2])
