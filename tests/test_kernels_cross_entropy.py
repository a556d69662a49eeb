"""The chunk cross-entropy kernel: loss and in-place gradient of the Triton path (run by Triton's interpreter in a
subprocess) against the plain-torch reference (loss.py's code) and against the oracle, F.cross_entropy on the
capped fp32 logits with autograd's gradient, in fp32, bf16 and fp16, with and without a softcap of 30.

Cases force several tiles with a small block and a vocabulary that is not a multiple of it (V = 1000, block 256:
a masked last tile), one masked tile with the default block, c = 1 and c = 7, logits of std 3 (like an LM's) and
logits spread over +-80 with the row max in the last tile and a row shifted to [-160, 0], so the online max and
its rescaling matter. Labels include the first and last column.

Tolerances. fp32: gradient within 1e-5 absolute, loss within 1e-4 relative (the kernel's exp and sum order differ
from torch's by fp32 ulps). bf16/fp16: the gradient within one ulp of the fp32 gradient rounded once (the
interpreter may truncate fp32 -> bf16 where torch and GPUs round to nearest), the loss within 1e-3 relative (both
compute in fp32 from the same upcast logits, so it is in fact much closer)."""
from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import report, run_interpreted
from minilora.kernels.cross_entropy import (BLOCK, ce_loss, ce_loss_and_grad_, ce_loss_and_grad_reference_,
                                            ce_loss_and_grad_triton_, ce_loss_reference)

# name -> (c, V, block): several tiles with a masked tail; one masked tile of the default block
SHAPES = {"1x1000": (1, 1000, 256), "7x1000": (7, 1000, 256), "7x1000-oneblock": (7, 1000, BLOCK),
          "3x4099": (3, 4099, 1024)}
CASES = {f"{dt}-cap{cap}-{scale}-{shape}": (dt, cap, scale, shape)
         for dt in ("float32", "bfloat16") for cap in (None, 30.0) for scale in ("std3", "pm80") for shape in SHAPES}
CASES.update({f"float16-cap{cap}-{scale}-7x1000": ("float16", cap, scale, "7x1000")
              for cap in (None, 30.0) for scale in ("std3", "pm80")})


def inputs(name: str) -> tuple[torch.Tensor, torch.Tensor, float | None, int]:
    """z [c, V], y [c], softcap, block for case `name` (the same in the subprocess and here)."""
    dt, cap, scale, shape = CASES[name]
    c, V, block = SHAPES[shape]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    if scale == "std3":
        z = torch.randn(c, V, generator=gen) * 3
    else:
        z = torch.rand(c, V, generator=gen) * 160 - 80
        z[0, V - 5] = 80.0  # the row max in the last tile: the running sum must be rescaled
        if c > 1:
            z[1] -= 80  # all of a row in [-160, 0]
    y = torch.randint(0, V, (c,), generator=gen)
    y[0] = V - 1  # in the masked last tile
    if c > 1:
        y[-1] = 0
    return z.to(getattr(torch, dt)), y, cap, block


def oracle(z: torch.Tensor, y: torch.Tensor, cap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """F.cross_entropy(softcap(z.float()), y, reduction="sum") and its autograd gradient wrt z (fp32)."""
    z = z.float().requires_grad_()
    s = z if cap is None else cap * torch.tanh(z / cap)
    loss = F.cross_entropy(s, y, reduction="sum")
    loss.backward()
    return loss.detach(), z.grad


INTERPRETER_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, sys.argv[2])  # tests/, for this module's CASES and inputs
    from test_kernels_cross_entropy import CASES, inputs
    from minilora.kernels import cross_entropy as K

    out = {}
    for name in CASES:
        z, y, cap, block = inputs(name)
        g = z.clone()
        loss = K.ce_loss_and_grad_triton_(g, y, cap, block=block)
        zz = z.clone()
        loss_only = K.ce_loss_triton(zz, y, cap, block=block)
        out[name] = {"loss": loss, "grad": g, "loss_only": loss_only, "z_after_loss_only": zz}
    torch.save(out, sys.argv[1])
""")


@pytest.fixture(scope="module")
def triton_out(tmp_path_factory):
    """The Triton path of every case, run once in the interpreter (see conftest.run_interpreted)."""
    return run_interpreted(INTERPRETER_SCRIPT, tmp_path_factory.mktemp("cross_entropy") / "out.pt")


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` numbers at |x|: eps 2^floor(log2|x|), and the smallest subnormal below tiny."""
    fi = torch.finfo(dtype)
    _, e = torch.frexp(x.float().abs())  # |x| = m 2^e, m in [0.5, 1)
    return torch.ldexp(torch.full(x.shape, fi.eps), e - 1).clamp(min=fi.tiny * fi.eps)


def check_grad(name: str, ours: torch.Tensor, ref_fp32: torch.Tensor) -> None:
    """ours (z's dtype) against an fp32 gradient: 1e-5 absolute in fp32, else one ulp of the rounded value."""
    assert torch.isfinite(ours).all(), f"{name}: non-finite gradient"
    if ours.dtype == torch.float32:
        mx, _ = report(name, ours, ref_fp32)
        assert mx <= 1e-5, f"{name}: max abs diff {mx:.3g} > 1e-5"
        return
    ref = ref_fp32.to(ours.dtype)
    report(name, ours, ref)
    diff = (ours.double() - ref.double()).abs()
    # at least fp32's smallest normal: below it, fp32 (and bf16) values are subnormal, which GPUs' exp may
    # flush and Triton's interpreter rounds loosely; a probability under 1e-38 is zero to any optimiser
    tol = torch.maximum(ulp(ours, ours.dtype), ulp(ref, ours.dtype)).clamp(min=torch.finfo(torch.float32).tiny)
    bad = diff > tol.double()
    assert not bad.any(), f"{name}: {bad.sum().item()} values more than one {ours.dtype} ulp off"


def check_loss(name: str, ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert ours.dtype == torch.float32 and ours.dim() == 0
    rel = ((ours.double() - ref.double()).abs() / ref.double().abs()).item()
    print(f"{name}: {ours.item():.8g} vs {ref.item():.8g}, relative diff {rel:.3g}")
    assert rel <= (1e-4 if dtype == torch.float32 else 1e-3), f"{name}: relative diff {rel:.3g}"


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference_and_oracle(triton_out, name):
    z, y, cap, _ = inputs(name)
    res = triton_out[name]
    assert res["grad"].dtype == z.dtype and res["grad"].shape == z.shape
    ref_grad = z.clone()
    ref_loss = ce_loss_and_grad_reference_(ref_grad, y, cap)
    truth_loss, truth_grad = oracle(z, y, cap)

    check_loss(f"{name} triton loss vs reference", res["loss"], ref_loss, z.dtype)
    check_loss(f"{name} triton loss vs F.cross_entropy", res["loss"], truth_loss, z.dtype)
    check_grad(f"{name} triton grad vs F.cross_entropy autograd", res["grad"], truth_grad)
    if z.dtype == torch.float32:
        check_grad(f"{name} triton grad vs reference", res["grad"], ref_grad)
    else:  # two roundings to z's dtype of nearly equal fp32 values: one ulp apart at most
        check_grad(f"{name} triton grad vs reference", res["grad"], ref_grad.float())

    # pass 1 alone: the very same loss, z untouched
    assert torch.equal(res["loss_only"], res["loss"])
    assert torch.equal(res["z_after_loss_only"], z)


@pytest.mark.parametrize("name", [n for n in CASES if n.endswith("7x1000")])
def test_reference_matches_oracle(name):
    """The reference (loss.py's code, also the CPU path) against F.cross_entropy, and its no-grad variant."""
    z, y, cap, _ = inputs(name)
    truth_loss, truth_grad = oracle(z, y, cap)
    g = z.clone()
    loss = ce_loss_and_grad_reference_(g, y, cap)
    check_loss(f"{name} reference loss vs F.cross_entropy", loss, truth_loss, z.dtype)
    check_grad(f"{name} reference grad vs F.cross_entropy autograd", g, truth_grad)
    zz = z.clone()
    assert torch.equal(ce_loss_reference(zz, y, cap), loss)
    assert torch.equal(zz, z)


def test_cpu_dispatch_takes_reference():
    z, y, cap, _ = inputs("bfloat16-cap30.0-pm80-7x1000")
    a, b = z.clone(), z.clone()
    assert torch.equal(ce_loss_and_grad_(a, y, cap), ce_loss_and_grad_reference_(b, y, cap))
    assert torch.equal(a, b)
    assert torch.equal(ce_loss(z, y, cap), ce_loss_reference(z, y, cap))


def test_no_rows():
    z, y = torch.empty(0, 50, dtype=torch.bfloat16), torch.empty(0, dtype=torch.int64)
    # no kernel launch for c = 0, so the Triton launcher runs here without the interpreter
    for fn in (ce_loss_and_grad_triton_, ce_loss_and_grad_reference_, ce_loss_reference):
        loss = fn(z, y, 30.0)
        assert loss.dtype == torch.float32 and loss.item() == 0.0


def test_bad_inputs():
    z, y = torch.randn(3, 10), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match=r"cross_entropy: labels y must be int64 \[3\].*\[4\]"):
        ce_loss_and_grad_(z, torch.tensor([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="int64.*torch.int32"):
        ce_loss_and_grad_(z, y.int())
    with pytest.raises(ValueError, match=r"2-D.*\[30\]"):
        ce_loss(z.reshape(-1), y)
    with pytest.raises(ValueError, match="torch.float64"):
        ce_loss_and_grad_(z.double(), y)
    with pytest.raises(ValueError, match="contiguous"):
        ce_loss_and_grad_(torch.randn(10, 3).T, y)
    with pytest.raises(ValueError, match="softcap"):
        ce_loss_and_grad_(z, y, softcap=0.0)
    with pytest.raises(ValueError, match="block"):
        ce_loss_and_grad_triton_(z, y, block=100)
