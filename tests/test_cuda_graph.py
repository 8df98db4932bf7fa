"""The EMA and the enqueue captured in one CUDA graph and replayed with a new momentum and pointer."""
import pytest
import torch

from moco_fast import ops
from moco_fast.reference import enqueue_ref_, momentum_update_ref_

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
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
