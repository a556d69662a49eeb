"""Fused RMSNorm (kernels/rmsnorm.py): the Triton autograd Function, run by Triton's interpreter on the CPU, against
the plain-torch reference, forward and backward (dx, dweight); the reference against models.common.RMSNorm.

TRITON_INTERPRET must be set before triton.jit decorates the kernels, and another test file may have imported
the module first, so the kernel checks run this file as a script in a fresh interpreter (as test_nf4.py does).
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # the kernel run (see test_triton_matches_reference_in_interpreter)
    os.environ["TRITON_INTERPRET"] = "1"

import subprocess
import sys

import pytest
import torch

from conftest import report
from minilora.kernels.rmsnorm import RMSNormFunction, rmsnorm, rmsnorm_reference
from minilora.models.common import RMSNorm

EPS = 1e-6
f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
# shape, x dtype, weight dtype, offset (0: Llama, 1: Gemma), input transposed (non-contiguous).
# D = 96 and 200 give 16 and 8 rows a program (the last tile partly masked); D = 2100 one row a program, and
# 10 tiles for the interpreter's 4 backward programs (the grid-stride loop). [3, 4, 2, D] is a q/k norm.
CASES = [
    ((2, 5, 96), f32, f32, 0.0, False), ((2, 5, 96), f32, f32, 1.0, False),
    ((3, 4, 2, 200), f32, f32, 0.0, True), ((3, 4, 2, 200), f32, f32, 1.0, True),
    ((2, 5, 96), bf16, bf16, 0.0, False), ((2, 5, 96), bf16, bf16, 1.0, False),
    ((3, 4, 2, 200), bf16, bf16, 0.0, True), ((3, 4, 2, 200), bf16, bf16, 1.0, False),
    ((2, 5, 200), bf16, f32, 0.0, False),  # fp32 weight on bf16 activations: y and dweight come out fp32
    ((2, 5, 200), f16, f16, 0.0, False),
    ((10, 2100), bf16, bf16, 0.0, False), ((10, 2100), f32, f32, 1.0, False),
]


def inputs(shape, dtype, w_dtype, offset, transposed, seed=0):
    """x with rows of different scales, a weight far from its init (ones / zeros hide bugs), an upstream grad."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * (0.5 + 2 * torch.rand(*shape[:-1], 1, generator=g))
    if transposed:  # same values, laid out [B, H, T, D] and viewed as [B, T, H, D]
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    w = torch.randn(shape[-1], generator=g) * 0.3 + (0.0 if offset else 1.0)
    dy = torch.randn(shape, generator=g)
    return x.to(dtype), w.to(w_dtype), dy


def run(fn, x, w, dy, offset):
    """y, dx, dweight of fn(x, w) for upstream gradient dy (cast to y's dtype)."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = fn(x, w, EPS, offset)
    dx, dw = torch.autograd.grad(y, (x, w), dy.to(y.dtype))
    return y.detach(), dx, dw


def check_case(shape, dtype, w_dtype, offset, transposed):
    x, w, dy = inputs(shape, dtype, w_dtype, offset, transposed)
    assert x.is_contiguous() != transposed
    tri = run(RMSNormFunction.apply, x, w, dy, offset)
    ref = run(rmsnorm_reference, x, w, dy, offset)
    exact = run(rmsnorm_reference, x.double(), w.double(), dy.double(), offset)  # the same formulas, no rounding
    for name, t, r, e in zip(("y", "dx", "dweight"), tri, ref, exact):
        assert (t.dtype, t.shape) == (r.dtype, r.shape), (name, t.dtype, r.dtype, t.shape, r.shape)
        mx, _ = report(f"{list(shape)} x {dtype} w {w_dtype} offset {offset} {name}", t, r)
        big = e.abs().max().item()
        if dtype == torch.float32:
            tol = 1e-5
        else:  # twice the reference's own rounding error, plus one ulp: the interpreter's casts to bf16 truncate
            tol = 2 * (r.double() - e).abs().max().item() + torch.finfo(dtype).eps * big
        print(f"    tolerance {tol:.3g}")
        assert mx <= tol, (name, mx, tol)


def check_saved_tensors_and_partial_grads():
    """The Function keeps x itself, the weight and rstd [N] fp32, nothing of size N*D more; and it returns only
    the gradients asked for (frozen weight: the QLoRA case; no grad into x: a norm right after the embedding),
    the same floats as when both are asked for."""
    x, w, dy = inputs((3, 4, 2, 200), bf16, bf16, 0.0, True)
    _, dx_both, dw_both = run(RMSNormFunction.apply, x, w, dy, 0.0)
    x.requires_grad_()
    y = RMSNormFunction.apply(x, w, EPS, 0.0)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 3
    assert (saved[0].data_ptr(), saved[0].shape, saved[0].stride()) == (x.data_ptr(), x.shape, x.stride())
    assert saved[1].data_ptr() == w.data_ptr() and (saved[2].dtype, saved[2].shape) == (f32, (24,))
    (dx,) = torch.autograd.grad(y, x, dy.to(bf16))
    w.requires_grad_()
    (dw,) = torch.autograd.grad(RMSNormFunction.apply(x.detach(), w, EPS, 0.0), w, dy.to(bf16))
    assert torch.equal(dx, dx_both) and torch.equal(dw, dw_both)


def test_triton_matches_reference_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


@pytest.mark.parametrize("dtype", [f32, bf16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_reference_is_models_common_rmsnorm(dtype, offset):
    """Same floats out of the module's forward, and the same gradients, so the lead can swap one for the other.
    On the CPU `rmsnorm` is the reference."""
    x, w, dy = inputs((2, 5, 96), dtype, dtype, offset, False, seed=1)
    norm = RMSNorm(96, EPS, offset).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
    xm = x.clone().requires_grad_()
    y = norm(xm)
    y.backward(dy.to(y.dtype))
    ours = run(rmsnorm, x, w, dy, offset)
    for name, a, b in zip(("y", "dx", "dweight"), ours, (y, xm.grad, norm.weight.grad)):
        mx, _ = report(f"{dtype} offset {offset} {name}", a, b)
        assert a.dtype == b.dtype and mx == 0, name


def test_bad_input_is_refused_with_file_and_shapes():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"kernels/rmsnorm\.py: weight must have shape \[D\].*\[7\].*\[2, 8\]"):
        rmsnorm(x, torch.ones(7), EPS)
    with pytest.raises(ValueError, match=r"kernels/rmsnorm\.py: x and weight must be fp32, bf16 or fp16"):
        rmsnorm(x.double(), torch.ones(8), EPS)


if __name__ == "__main__":
    for case in CASES:
        check_case(*case)
    check_saved_tensors_and_partial_grads()
    print("all kernel checks passed")
