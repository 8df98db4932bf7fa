"""The Triton kernels, one file per op: `@triton.jit` kernels and plain launchers, no torch.library or autograd.

Imported as moco_fast.kernels, by one mechanism: moco_fast/kernels is a symbolic link to this folder, so a
checkout imports it as a plain subpackage, and setup.py packages it through that link (a wheel holds the files).
A launcher is reached through its op (moco_fast/ops/<op>.py), whose input checks run first; it checks only
what its kernels assume beyond them (dtypes they have no code for, strides they index by hand).
"""
