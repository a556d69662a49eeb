"""Triton kernels, each beside a plain-torch reference of the same function and one dispatch function.

Every dispatch asks `use_triton(t, name)`: the kernel for CUDA tensors, the reference elsewhere. The environment
variable MINILORA_TRITON narrows that for before/after benchmarks and for ruling a kernel out when chasing a
numerical problem: `0` sends CUDA tensors to every reference, a comma list (`nf4,rmsnorm`) keeps only the named
kernels (names: nf4, rmsnorm, gated_act, rope, cross_entropy,
adamw8bit); unset or `1`, all of them run.
"""
import os

import torch


def use_triton(t: torch.Tensor, name: str) -> bool:
    if not t.is_cuda:
        return False
    allowed = os.environ.get("MINILORA_TRITON", "1")
    return allowed == "1" or name in allowed.split(",")
