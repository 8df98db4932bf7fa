"""moco_fast.data.sampling: the one epoch sampler and the one seed hash, against the schemes they replace
(DistributedSampler, a (seed + epoch) permutation, the two seed formulas), and make_loader's order."""
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from moco_fast import data as D
from moco_fast.data import EpochSampler, SeededSamples, TensorBatches, seed_hash

# ------------------------------------------------------------------------------------------------
# the order: DistributedSampler's, sharded and resumable


@pytest.mark.parametrize("n,world_size", [(10, 1), (10, 3), (9, 3), (1, 1), (7, 4)], ids=str)
@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffle", "in-order"])
@pytest.mark.parametrize("drop_last", [True, False], ids=["drop", "pad"])
def test_epoch_sampler_is_distributed_samplers_order(n, world_size, shuffle, drop_last):
    for rank in range(world_size):
        ours = EpochSampler(range(n), 2, seed=3, rank=rank, world_size=world_size, shuffle=shuffle, drop_last=drop_last)
        ref = DistributedSampler(range(n), world_size, rank, shuffle=shuffle, seed=3, drop_last=drop_last)
        for epoch in (0, 5):
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert list(ours) == [(epoch, i) for i in ref] and len(ours) == len(ref)
            assert ours.indices().tolist() == list(ref)


def test_one_process_order_is_the_seed_plus_epoch_permutation():
    """What data.EpochRandomSampler and lincls.TensorBatches drew (and every DataLoader of the trainer)."""
    sampler = EpochSampler(range(50), 8, seed=11)
    sampler.set_epoch(4)
    assert sampler.indices().tolist() == torch.randperm(50, generator=torch.Generator().manual_seed(15)).tolist()


def test_skip_batches_resumes_mid_epoch():
    sampler = EpochSampler(range(30), 4, seed=1, rank=1, world_size=2)
    sampler.set_epoch(2)
    whole = list(sampler)
    assert sampler.full_batches == 15 // 4 and len(whole) == 15
    sampler.set_epoch(2, skip_batches=2)
    assert list(sampler) == whole[8:] and len(sampler) == 7 and sampler.full_batches == 3
    sampler.set_epoch(3)
    assert sampler.skip_batches == 0 and len(list(sampler)) == 15


@pytest.mark.parametrize("world_size", [1, 3])
def test_tensor_batches_keep_their_order(world_size):
    """lincls' cached features: randperm(seed + epoch), this rank's equal share, the last batch short."""
    n, batch = 23, 4
    features, labels = torch.arange(n, dtype=torch.float32)[:, None] * 10, torch.arange(n)
    for rank in range(world_size):
        tb = TensorBatches(features, labels, batch, shuffle=True, seed=2, rank=rank, world_size=world_size)
        tb.sampler.set_epoch(1)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(3))[rank:n - n % world_size:world_size]
        got = [y for _, y in tb]
        assert len(got) == len(tb) == -(-len(order) // batch)
        assert torch.equal(torch.cat(got), order)
        assert all(torch.equal(x[:, 0], y.float() * 10) for x, y in tb)
        tb.sampler.set_epoch(1, skip_batches=1)
        assert torch.equal(torch.cat([y for _, y in tb]), order[batch:]) and len(tb) == len(got)
    val = TensorBatches(features, labels, batch, shuffle=False)
    assert torch.equal(torch.cat([y for _, y in val]), labels)


# ------------------------------------------------------------------------------------------------
# the seed hash: the two formulas it replaces, unchanged


@pytest.mark.parametrize("seed", [0, 3, 9000])
def test_seed_hash_is_the_pil_and_the_device_formula(seed):
    for epoch, index in [(0, 0), (1, 5), (199, 1_281_166)]:  # was train.SeededSamples'
        assert seed_hash(seed, epoch, index) == (seed * 1_000_003 + epoch) * 1_000_000_007 + index
    for epoch, rank, batch in [(0, 0, 0), (3, 1, 7), (199, 7, 5004)]:  # was gpu_data.batch_generator's
        old = ((((seed * 1_000_003 + epoch) * 1_000_003) + rank) * 1_000_000_007 + batch) % (2**63 - 1)
        assert seed_hash(seed, epoch, rank, batch) == old
    assert 0 <= seed_hash(10**9, 10**4, 10**7) < 2**63  # large seeds no longer overflow torch.manual_seed
    torch.manual_seed(seed_hash(10**9, 10**4, 10**7))


class Draw(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.rand(()).item()


def test_seeded_samples_depend_on_the_key_alone_and_leave_the_main_rng():
    seeded = SeededSamples(Draw(), seed=4)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = seeded[(2, 7)]
    assert torch.equal(torch.get_rng_state(), before)  # the model's generator is not advanced
    assert seeded[(2, 7)] == a and seeded[(3, 7)] != a and SeededSamples(Draw(), seed=5)[(2, 7)] != a
    torch.manual_seed(seed_hash(4, 2, 7))
    assert a == torch.rand(()).item()
    assert SeededSamples(Draw(), seed=None)[(2, 7)] != SeededSamples(Draw(), seed=None)[(2, 7)]  # nothing seeded


# ------------------------------------------------------------------------------------------------
# make_loader: the generic loader over an EpochSampler


class Indices(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([float(i)]), i, ()


def order(loader):
    return [i for _, targets, _ in loader for i in targets.tolist()]


def test_loader_order_is_a_function_of_seed_and_epoch():
    loader = D.make_loader(Indices(20), batch_size=6, workers=0, shuffle=True, drop_last=False, seed=3)
    first = order(loader)
    assert sorted(first) == list(range(20)) and first != list(range(20))
    assert order(loader) == first  # iterating again replays the epoch: no hidden generator state
    loader.sampler.set_epoch(1)
    second = order(loader)
    assert second != first and sorted(second) == list(range(20))
    again = D.make_loader(Indices(20), batch_size=6, workers=0, shuffle=True, drop_last=False, seed=3)
    assert order(again) == first
    again.sampler.set_epoch(1)
    assert order(again) == second
    other = D.make_loader(Indices(20), batch_size=6, workers=0, shuffle=True, drop_last=False, seed=4)
    assert order(other) != first


def test_loader_options():
    loader = D.make_loader(Indices(10), batch_size=4, workers=0, shuffle=False, drop_last=True)
    assert order(loader) == list(range(8)) and len(loader) == 2
    assert loader.pin_memory == torch.cuda.is_available() and not loader.persistent_workers
    assert loader.collate_fn is D.collate_with_skipped
    assert D.make_loader(Indices(10), 4, 0, False, False, pin_memory=False).pin_memory is False


def test_distributed_loader(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        loader = D.make_loader(Indices(10), batch_size=4, workers=0, shuffle=True, drop_last=False, seed=2,
                               distributed=True)
        assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.seed == 2
        first = order(loader)
        loader.sampler.set_epoch(1)
        assert sorted(first) == list(range(10)) and order(loader) != first
    finally:
        dist.destroy_process_group()


class RandomCrops(Dataset):
    """Items drawn from torch's, Python's and numpy's generators, as a random transform would."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        import random
        import numpy as np
        return torch.tensor([torch.rand(()).item(), random.random(), np.random.rand()]), i, ()


def test_shuffled_loader_draws_the_same_with_any_workers_and_after_a_resume():
    """What linear classification's augmented loader relies on: draws seeded by (seed, epoch, index)."""
    def batches(workers, skip=0):
        loader = D.make_loader(RandomCrops(), batch_size=4, workers=workers, shuffle=True, drop_last=False, seed=7)
        loader.sampler.set_epoch(2, skip_batches=skip)
        return [(x, t) for x, t, _ in loader]
    alone, workers, resumed = batches(0), batches(2), batches(0, skip=1)
    assert len(alone) == 3 and len(resumed) == 2
    for (a, ta), (b, tb) in zip(alone, workers):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    for (a, ta), (b, tb) in zip(alone[1:], resumed):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    assert len({tuple(row.tolist()) for x, _ in alone for row in x}) == 12  # each sample its own draws
