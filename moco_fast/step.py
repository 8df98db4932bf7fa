"""One optimizer step of MoCo (forward under autocast, backward, SGD), eager or replayed as one CUDA graph.

With `cuda_graph=True` the first `warmup` calls run eagerly on a side stream (compilation, cuDNN
autotuning, the optimizer's momentum buffers, DDP's bucket rebuild), the next call is captured
(forward: query encoder, momentum update with the momentum as a device tensor, key encoder with
shuffle or split BN, fused InfoNCE, enqueue; backward; the SGD step with the learning rate as a device
tensor) and run, and every later call copies its images into the graph's static input buffers and
replays it. Nothing in the captured step may wait for the host; what does is reported at capture as a
GraphCaptureError, never as a silent slowdown.

Under DDP this follows PyTorch's documented whole-network capture with NCCL collectives
(docs/notes/cuda "Usage with DistributedDataParallel"): TORCH_NCCL_ASYNC_ERROR_HANDLING=0 before the
process group starts (`setup_distributed(cuda_graph=True)`), at least 11 eager DDP iterations before
capture; the all-gathers and broadcast of shuffle BN and DDP's gradient all-reduce are inside the graph.
"""
from __future__ import annotations

import torch

DDP_WARMUP = 11  # PyTorch's documented minimum of eager DDP iterations before capture


class GraphCaptureError(RuntimeError):
    """Something in the step cannot live in a CUDA graph; the message says what and what to do."""


def fast_cuda_settings() -> None:
    """cuDNN autotuning (the step's shapes never change: drop_last) and TF32 for what stays fp32."""
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")


def set_learning_rate(opt: torch.optim.Optimizer, lr: float) -> None:
    """Write lr into every group: in place when it is a device tensor (a captured step reads it there)."""
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """opt.state_dict() with plain float learning rates, so checkpoints load anywhere."""
    state = opt.state_dict()
    for group in state["param_groups"]:  # fresh dicts, the optimizer's own are untouched
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = float(group["lr"])
    return state


def check_capturable(model, device: torch.device) -> None:
    """Fail before any work when the step cannot be captured: a CPU device, or an op backend that syncs."""
    if device.type != "cuda":
        raise GraphCaptureError(f"--cuda-graph needs a CUDA device; this run is on {device.type} "
                                "(drop --cuda-graph, or run on a GPU)")
    from moco_fast.ops import resolve
    # the reference infonce is plain tensor work and can be captured; these two read a value on the host
    host_reads = {"enqueue": "the queue pointer", "momentum_update": "the momentum tensor"}
    for op, what in host_reads.items():
        if resolve(op, model.backend, "cuda") == "reference":
            raise GraphCaptureError(
                f"--cuda-graph: the 'reference' backend of {op} reads {what} on the host (a sync that "
                "cannot be captured); use --backend auto, cuda or triton, or drop --cuda-graph")


class TrainStep:
    """Call with (im_q, im_k); returns a fresh fp32 device tensor [loss, acc1, acc5] (no host sync)."""

    def __init__(self, forward, opt: torch.optim.Optimizer, device: torch.device, bf16: bool,
                 cuda_graph: bool = False, warmup: int = 3, capture: bool = True):
        self.forward, self.opt, self.device, self.bf16 = forward, opt, device, bf16
        self.cuda_graph, self.warmup, self.calls = cuda_graph, warmup, 0
        self.capture = capture  # False: static buffers and device lr without capturing (CPU tests only)
        self.graph = self.static = self.out = None
        if cuda_graph:
            # A captured SGD must read its learning rate from the device (fused SGD reads an fp32 one).
            dtype = torch.float32 if device.type == "cuda" else torch.float64
            for group in opt.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), dtype=dtype, device=device)

    def _step(self, im_q: torch.Tensor, im_k: torch.Tensor) -> torch.Tensor:
        # no autocast weight cache in a graph (PyTorch's advice for capture): the casts are replayed
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16,
                            cache_enabled=not self.cuda_graph):
            loss, stats = self.forward(im_q, im_k)
        self.opt.zero_grad(set_to_none=True)  # captured: backward allocates the grads in the graph's pool
        loss.backward()
        self.opt.step()
        return torch.stack([loss.detach().float(), stats["acc1"].float(), stats["acc5"].float()])

    def __call__(self, im_q: torch.Tensor, im_k: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if not self.cuda_graph:
            return self._step(im_q, im_k)
        if self.calls <= self.warmup:
            return self._warm(im_q, im_k)
        if self.static is None:  # the first call past the warm-up: capture, then run it
            self.static = (im_q.clone(), im_k.clone())
            self._capture()
        else:
            self.static[0].copy_(im_q, non_blocking=True)
            self.static[1].copy_(im_k, non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
        else:  # capture=False
            self.out = self._step(*self.static)
        return self.out.clone()  # the graph overwrites self.out at the next replay

    def _warm(self, im_q, im_k) -> torch.Tensor:
        if self.device.type != "cuda":
            return self._step(im_q, im_k)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self._step(im_q, im_k)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self) -> None:
        if not self.capture:
            return
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the loader's pin-memory thread may allocate while we capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.out = self._step(*self.static)
        except Exception as err:
            raise GraphCaptureError(
                "--cuda-graph: the training step could not be captured in one CUDA graph: "
                f"{type(err).__name__}: {err}\nSomething in the step waits for the host (a .item(), a "
                "data-dependent shape, a CPU tensor, an op backend that reads a value on the host). Run "
                "without --cuda-graph, or remove that from the step.") from err
        self.graph = graph  # the capture recorded this step's kernels without running them: replayed next
