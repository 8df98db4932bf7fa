"""The Triton kernels, one file per op: `@triton.jit` kernels and plain launchers, no torch.library or autograd.

Imported as moco_fast.kernels (installed, or registered from a checkout by moco_fast.ops._backends.triton_module).
A launcher is reached through its op (moco_fast/ops/<op>.py), whose input checks run first; it checks only
what its kernels assume beyond them (dtypes they have no code for, strides they index by hand).
"""
