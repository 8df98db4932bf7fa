"""The MoCo module against the port of the official one, plus what it adds beyond it."""
import functools

import pytest
import torch
import torch.nn.functional as F
import torchvision

from moco_fast import ops
from moco_fast.model import MoCo, SplitBatchNorm, convert_split_bn
from moco_fast.reference import MoCoRef, infonce_ref

resnet18 = torchvision.models.resnet18
DIM, N = 16, 8


def images(dtype=torch.float32):
    return torch.randn(N, 3, 32, 32, dtype=dtype), torch.randn(N, 3, 32, 32, dtype=dtype)


def paired_models(K, mlp, backend, dtype=torch.float32):
    """The official port and ours, holding the same weights and queue."""
    ref = MoCoRef(resnet18, dim=DIM, K=K, m=0.99, T=0.2, mlp=mlp).to(dtype)
    ours = MoCo(resnet18, dim=DIM, K=K, m=0.99, T=0.2, mlp=mlp, backend=backend).to(dtype)
    ours.encoder_q.load_state_dict(ref.encoder_q.state_dict())
    ours.encoder_k.load_state_dict(ref.encoder_k.state_dict())
    ours.queue.copy_(ref.queue.T)
    return ref, ours


def sgd(model):
    return torch.optim.SGD(model.encoder_q.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)


def key_params(model):
    return torch.cat([p.flatten() for p in model.encoder_k.parameters()])


@pytest.mark.parametrize("mlp", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_five_steps_match_official(backend, mlp):
    """Each step starts the official port from our query encoder; the key encoder, the queue and the
    pointer are never copied over, so they must stay bitwise the official ones on their own."""
    ref, ours = paired_models(K=32, mlp=mlp, backend=backend)
    opt = sgd(ours)
    for step in range(5):
        im_q, im_k = images()
        loss_ref = F.cross_entropy(*ref(im_q, im_k))
        loss, stats = ours(im_q, im_k)
        assert abs(loss.item() - loss_ref.item()) < 1e-5, (step, loss.item(), loss_ref.item())
        assert torch.equal(ours.queue_ptr, ref.queue_ptr)
        assert torch.equal(key_params(ours), key_params(ref))
        assert torch.equal(ours.queue, ref.queue.T)
        assert 0.0 <= stats["acc1"].item() <= stats["acc5"].item() <= 1.0
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref.encoder_q.load_state_dict(ours.encoder_q.state_dict())


def test_five_steps_match_official_float64():
    """Whole trajectories, each model with its own optimizer: in float64 they differ by roundings only.
    (In fp32 the roundings of two equal gradients grow ~10x per step through BatchNorm on 8 samples.)"""
    ref, ours = paired_models(K=24, mlp=True, backend="cpu", dtype=torch.float64)
    opt_ref, opt_ours = sgd(ref), sgd(ours)
    for _ in range(5):
        im_q, im_k = images(torch.float64)
        loss_ref = F.cross_entropy(*ref(im_q, im_k))
        loss, _ = ours(im_q, im_k)
        assert abs(loss.item() - loss_ref.item()) < 1e-12
        for opt, value in ((opt_ref, loss_ref), (opt_ours, loss)):
            opt.zero_grad()
            value.backward()
            opt.step()
    torch.testing.assert_close(ours.queue, ref.queue.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(key_params(ours), key_params(ref), rtol=0, atol=1e-12)
    assert torch.equal(ours.queue_ptr, ref.queue_ptr)


def test_any_queue_size_and_bf16_queue():
    """K need not be a multiple of the batch (the official code asserts it is); the queue may be bf16."""
    model = MoCo(resnet18, dim=DIM, K=50, queue_dtype=torch.bfloat16)
    model_f32 = MoCo(resnet18, dim=DIM, K=50)
    model_f32.load_state_dict(model.state_dict())
    for step in range(1, 8):
        im_q, im_k = images()
        loss, stats = model(im_q, im_k)
        loss_f32, _ = model_f32(im_q, im_k)
        assert model.queue.dtype == torch.bfloat16 and int(model.queue_ptr) == (step * N) % 50
        assert abs(loss.item() - loss_f32.item()) < 0.05 * loss_f32.item()
        assert 0.0 <= stats["acc1"].item() <= stats["acc5"].item() <= 1.0


def test_symmetric_loss():
    model = MoCo(resnet18, dim=DIM, K=40, T=0.2, symmetric=True).eval()  # eval: BatchNorm independent of batch
    queue = model.queue.clone()
    im_1, im_2 = images()
    loss, _ = model(im_1, im_2)
    with torch.no_grad():
        q1, q2 = (F.normalize(model.encoder_q(x), dim=1) for x in (im_1, im_2))
        k1, k2 = (F.normalize(model.encoder_k(x), dim=1) for x in (im_1, im_2))
    expected = infonce_ref(q1, k2, queue, 0.2) + infonce_ref(q2, k1, queue, 0.2)
    assert abs(loss.item() - expected.item()) < 1e-5
    torch.testing.assert_close(model.queue[: 2 * N], torch.cat([k1, k2]))
    assert int(model.queue_ptr) == 2 * N


def test_split_batchnorm_normalises_each_split():
    bn = SplitBatchNorm(3, num_splits=2)
    x = torch.randn(8, 3, 4, 4) * 3 + 1
    out = bn(x)
    for s in range(2):  # split s holds samples s, s+2, s+4, ...
        expected = F.batch_norm(x[s::2], None, None, training=True)
        torch.testing.assert_close(out[s::2], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch size 7 is not a multiple of bn_splits=2"):
        bn(x[:7])
    model = convert_split_bn(resnet18(num_classes=4), 4)
    assert sum(isinstance(m, SplitBatchNorm) for m in model.modules()) == 20


def test_key_shuffle_is_undone():
    """With split BN the keys are computed on a shuffled batch, then put back in order."""
    model = MoCo(resnet18, dim=DIM, K=16, bn_splits=2)
    model.encoder_k.eval()  # in eval mode the shuffle must be invisible
    im_k = torch.randn(N, 3, 32, 32)
    with torch.no_grad():
        expected = F.normalize(model.encoder_k(im_k), dim=1)
        torch.testing.assert_close(model._key_features(im_k), expected)


def test_momentum_schedule_and_ema_buffers():
    model = MoCo(resnet18, dim=DIM, K=16, m=0.5, ema_buffers=True)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)
        model.encoder_q.bn1.running_mean.fill_(4.0)
    before = key_params(model)
    model.set_momentum(0.25)
    model._momentum_update_key_encoder()
    after_q = torch.cat([p.flatten() for p in model.encoder_q.parameters()])
    torch.testing.assert_close(key_params(model), 0.25 * before + 0.75 * after_q)
    torch.testing.assert_close(model.encoder_k.bn1.running_mean, torch.full((64,), 3.0))


def test_load_official_checkpoint():
    ref = MoCoRef(resnet18, dim=DIM, K=24, mlp=True)
    state = {f"module.{key}": value for key, value in ref.state_dict().items()}  # as saved under DDP
    model = MoCo(resnet18, dim=DIM, K=24, mlp=True)
    model.load_official_state_dict(state)
    assert torch.equal(model.queue, ref.queue.T)
    assert torch.equal(model.encoder_q.fc[0].weight, ref.encoder_q.fc[0].weight)
    del state["module.encoder_k.fc.0.bias"]
    with pytest.raises(KeyError, match=r"missing keys \['encoder_k.fc.0.bias'\]"):
        model.load_official_state_dict(state)


def test_model_compiles_fullgraph():
    model = MoCo(functools.partial(resnet18), dim=DIM, K=32)
    eager = MoCo(resnet18, dim=DIM, K=32)
    eager.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True)
    for _ in range(2):
        im_q, im_k = images()
        loss, _ = compiled(im_q, im_k)
        loss_eager, _ = eager(im_q, im_k)
        assert abs(loss.item() - loss_eager.item()) < 1e-4
    torch.testing.assert_close(model.queue, eager.queue, rtol=1e-4, atol=1e-5)
    assert torch.equal(model.queue_ptr, eager.queue_ptr)


def test_bad_arguments():
    with pytest.raises(ValueError, match="need K >= 1"):
        MoCo(resnet18, K=0)
    assert ops.available_backends()["infonce"][0] == "reference"
