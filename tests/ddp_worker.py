"""Run by tests/test_distributed.py under torchrun: MoCo under gloo DDP against the official port.

Every step starts the official port from our query encoder (as in test_model.py); both shuffle the
keys across processes with the same random permutation. Each rank writes what it saw to OUT/rank<r>.pt.
"""
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP

from moco_fast.distributed import cleanup_distributed, concat_all_gather, setup_distributed
from moco_fast.model import MoCo
from moco_fast.reference import MoCoRef


def main(out_dir: str, steps: int = 4, per_rank_batch: int = 4) -> None:
    info = setup_distributed(device="cpu")
    torch.manual_seed(0)  # the same weights and queue on every rank
    ref = MoCoRef(torchvision.models.resnet18, dim=16, K=24, m=0.99, T=0.2, mlp=True)
    ours = MoCo(torchvision.models.resnet18, dim=16, K=24, m=0.99, T=0.2, mlp=True, backend="cpu")
    ours.load_state_dict({**ref.state_dict(), "queue": ref.queue.T})
    model = DDP(ours, broadcast_buffers=False)
    opt = torch.optim.SGD(ours.encoder_q.parameters(), lr=0.01, momentum=0.9)
    data = torch.Generator().manual_seed(100 + info.rank)  # each rank its own images
    record = {"loss": [], "loss_ref": [], "keys_equal": [], "queue_equal": [], "ptr": []}
    for _ in range(steps):
        im_q = torch.randn(per_rank_batch, 3, 32, 32, generator=data)
        im_k = torch.randn(per_rank_batch, 3, 32, 32, generator=data)
        rng = torch.get_rng_state()
        loss_ref = F.cross_entropy(*ref(im_q, im_k))
        torch.set_rng_state(rng)  # the same shuffle permutation for our step
        loss, _ = model(im_q, im_k)
        record["loss"].append(loss.item())
        record["loss_ref"].append(loss_ref.item())
        record["keys_equal"].append(all(torch.equal(a, b) for a, b in zip(ours.encoder_k.parameters(),
                                                                           ref.encoder_k.parameters())))
        record["queue_equal"].append(torch.equal(ours.queue, ref.queue.T))
        record["ptr"].append(int(ours.queue_ptr))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref.encoder_q.load_state_dict(ours.encoder_q.state_dict())
    queues = concat_all_gather(ours.queue.unsqueeze(0))
    record["queues_identical_across_ranks"] = all(torch.equal(queues[0], q) for q in queues)
    record["encoders_q_identical_across_ranks"] = all(
        torch.equal(p, g) for p in ours.encoder_q.parameters() for g in concat_all_gather(p.unsqueeze(0)))
    record["world_size"] = dist.get_world_size()
    torch.save(record, f"{out_dir}/rank{info.rank}.pt")
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
