"""Process-group setup from torchrun's environment, and the collectives MoCo needs."""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None, cuda_graph: bool = False) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    One process without those variables needs no group. NCCL when the device is CUDA, gloo otherwise.
    `device` ("cuda" or "cpu") defaults to CUDA when it is available. `cuda_graph`: NCCL's async error
    handling is turned off, as PyTorch documents for capturing collectives in a CUDA graph.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        if cuda_graph and use_cuda:
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "0"
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None,
                                **_attempt_store())
    return DistInfo(rank, world_size, local_rank, dev)


def _attempt_store() -> dict:
    """Under torchrun, the group's store keys prefixed by the restart count: a group restarted by
    --max-restarts otherwise reads the addresses its dead predecessor left in the agent's store and
    fails to connect (gloo: "connectFullMesh failed ... Connection refused")."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return {}
    store, rank, world_size = next(dist.rendezvous("env://"))
    return {"store": dist.PrefixStore(f"moco_fast/attempt{attempt}/", store), "rank": rank, "world_size": world_size}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def cleanup_distributed() -> None:
    global _HOST_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _HOST_GROUP = None


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """All processes' tensors concatenated along dim 0, in rank order. No gradient flows back."""
    if not is_distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


_HOST_GROUP = None


def host_group():
    """A gloo group over the same processes, for small host-side agreements (the stop flag, the resume
    step): on it a collective never touches the GPU or waits for its stream, whatever the main backend."""
    global _HOST_GROUP
    if _HOST_GROUP is None and is_distributed():
        _HOST_GROUP = dist.new_group(backend="gloo")
    return _HOST_GROUP


def agree_on_int(value: int, what: str) -> int:
    """value, checked to be the same on every process (RuntimeError naming `what` otherwise)."""
    if not is_distributed():
        return value
    t = torch.tensor([value, -value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=host_group())
    if int(t[0]) != -int(t[1]):
        raise RuntimeError(f"the processes disagree on {what}: between {-int(t[1])} and {int(t[0])}")
    return value
