"""The fused gated activation act(g) * u: GatedActFunction (the Triton kernels, run by Triton's interpreter in a
subprocess) against the plain-torch reference, forward and both gradients, in fp32 and bf16, for silu and
gelu_tanh; fp64 gradcheck of the Triton path; what each path saves for the backward; and the reference against
torch's own `F.silu(g) * u` / `F.gelu(g, approximate="tanh") * u`.

Tolerances. fp32: within 1e-6 of max(1, largest value), against torch and against an fp64 truth (the GPU's exp and
divide differ from torch's by a few ulps). bf16: within one bf16 ulp (2**-7 relative) of the fp32 result
rounded once, which the kernel computes (the interpreter truncates fp32 -> bf16 where GPUs round to nearest, so
one ulp, not half); and within 2**-6 relative of torch's bf16 composition, which rounds act(g) before the
product, so the two may sit two roundings apart."""
from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import report, run_interpreted
from minilora.kernels.gated_act import ACTIVATIONS, gated_act, gated_act_reference

# name -> (shape, dtype, activation); numels not multiples of the 1024-element BLOCK, several programs, one value
SHAPES = {"2x7x33": (2, 7, 33), "3x1500": (3, 1500), "1": (1,)}
CASES = {f"{act}-{dt}-{name}": (shape, dt, act)
         for act in ACTIVATIONS for dt in ("float32", "bfloat16") for name, shape in SHAPES.items()}
# tails (exp overflows to inf: -0 and 0 gradients, never nan), silu' = 0 near -1.2785, tiny values
EXTREMES = [-1e4, -100.0, -30.0, -10.0, -3.0, -1.2785, -1e-8, 0.0, 1e-8, 0.5, 3.0, 10.0, 30.0, 100.0, 1e4]
for act in ACTIVATIONS:
    for dt in ("float32", "bfloat16"):
        CASES[f"{act}-{dt}-extremes"] = ((len(EXTREMES),), dt, act)


def inputs(name: str):
    """g, u, dh for case `name` (the same in the subprocess and here): g spread to +-9, so the tails matter."""
    shape, dt, act = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    g = torch.randn(shape, generator=gen) * 3
    if name.endswith("extremes"):
        g = torch.tensor(EXTREMES)
    u, dh = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    return tuple(t.to(getattr(torch, dt)) for t in (g, u, dh))


def grads(fn, g, u, dh, act):
    """h, dg, du of fn(g, u, act) with dL/dh = dh."""
    g, u = g.clone().requires_grad_(), u.clone().requires_grad_()
    h = fn(g, u, act)
    h.backward(dh)
    return h.detach(), g.grad, u.grad


INTERPRETER_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, sys.argv[2])  # tests/, for this module's CASES and inputs
    from test_kernels_gated_act import CASES, grads, inputs
    from minilora.kernels import gated_act as K

    out = {}
    for name, (shape, dt, act) in CASES.items():
        g, u, dh = inputs(name)
        h, dg, du = grads(K.GatedActFunction.apply, g, u, dh, act)
        out[name] = {"h": h, "dg": dg, "du": du,
                     # a 16-element block: many programs and a masked tail even for small tensors
                     "h16": K.gated_act_forward_triton(g, u, act, block=16),
                     "dgdu16": K.gated_act_backward_triton(dh, g, u, act, block=16),
                     "dgduh16": K.gated_act_backward_triton(dh, g, u, act, block=16, store_h=True)}
        # inplace: dg over g, du over u, h over dh, on copies (the results must be the fresh ones' bits)
        gi, ui, dhi = g.clone(), u.clone(), dh.clone()
        res = K.gated_act_backward_triton(dhi, gi, ui, act, block=16, store_h=True, inplace=True)
        out[name]["inplace"] = (res, [t.data_ptr() for t in res] == [gi.data_ptr(), ui.data_ptr(), dhi.data_ptr()])

    # down_proj fused with the activation (minilora/lora.py): its backward takes h from the backward kernel
    from minilora.lora import GatedLoRAFunction
    from test_kernels_gated_act import gated_lora_inputs
    from test_checkpointing import CountMatmulFlops
    for act in K.ACTIVATIONS:
        leaves, W, dy = gated_lora_inputs()
        y = GatedLoRAFunction.apply(leaves[0], leaves[1], act, W, None, leaves[2], leaves[3], 0.5, False, True)
        y.backward(dy)
        out[f"gated_lora-{act}"] = [y.detach()] + [t.grad for t in leaves]
        # overwrite (what GatedMLP asks for): g and u are non-leaf outputs, their storage gets dg and du
        leaves, W, dy = gated_lora_inputs()
        g, u = leaves[0] * 1, leaves[1] * 1
        ptrs = g.data_ptr(), u.data_ptr()
        seen = {}
        g.register_hook(lambda d: seen.update(dg=d.data_ptr()))
        u.register_hook(lambda d: seen.update(du=d.data_ptr()))
        y = GatedLoRAFunction.apply(g, u, act, W, None, leaves[2], leaves[3], 0.5, True, True)
        y.backward(dy, retain_graph=True)
        try:
            y.backward(dy)
            second = "no error"
        except RuntimeError as e:
            second = str(e)
        out[f"gated_lora_overwrite-{act}"] = ([y.detach()] + [t.grad for t in leaves],
                                              (seen["dg"], seen["du"]) == ptrs, second)
        # need_output=False (a recompute, only backpropagated): y unset, and no product but xa = h Aᵀ
        leaves, W, dy = gated_lora_inputs()
        with CountMatmulFlops() as count:
            y = GatedLoRAFunction.apply(leaves[0], leaves[1], act, W, None, leaves[2], leaves[3], 0.5, False, False)
        y.backward(dy)
        out[f"gated_lora_no_output-{act}"] = ([t.grad for t in leaves], count.flops)

    # h.sum().backward() hands the backward an expanded, stride-0 dh; only g requiring grad gives du = None
    g, u, dh = inputs("silu-float32-2x7x33")
    gg = g.clone().requires_grad_()
    K.GatedActFunction.apply(gg, u, "silu").sum().backward()
    out["sum_dg"] = gg.grad

    for act in K.ACTIVATIONS:
        gen = torch.Generator().manual_seed(1)
        g = (torch.randn(3, 5, generator=gen, dtype=torch.float64) * 3).requires_grad_()
        u = torch.randn(3, 5, generator=gen, dtype=torch.float64).requires_grad_()
        try:
            ok = torch.autograd.gradcheck(lambda g, u: K.GatedActFunction.apply(g, u, act), (g, u))
        except Exception as e:  # gradcheck raises with the mismatching Jacobians
            ok = str(e)[-3000:]
        out[f"gradcheck-{act}"] = ok

        # bytes kept for the backward: Triton g and u, torch's composition also act(g)
        for path, fn in (("triton", K.GatedActFunction.apply), ("reference", K.gated_act_reference)):
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                fn(g.float(), u.float(), act)
            out[f"saved-{path}-{act}"] = sum(t.numel() * t.element_size() for t in saved)
    torch.save(out, sys.argv[1])
""")


@pytest.fixture(scope="module")
def triton_out(tmp_path_factory):
    """The Triton path of every case, run once in the interpreter (see conftest.run_interpreted)."""
    return run_interpreted(INTERPRETER_SCRIPT, tmp_path_factory.mktemp("gated_act") / "out.pt")


def close(name, ours, ref, rtol, atol):
    mx, _ = report(name, ours, ref)
    bad = (ours.double() - ref.double()).abs() > atol + rtol * ref.double().abs()
    assert not bad.any(), f"{name}: {bad.sum().item()} values off, max abs diff {mx:.3g}"
    assert ours.dtype == ref.dtype and ours.shape == ref.shape


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference(triton_out, name):
    _, dt, act = CASES[name]
    g, u, dh = inputs(name)
    res = triton_out[name]
    ours = res["h"], res["dg"], res["du"]
    torch_ = grads(gated_act_reference, g, u, dh, act)
    truth = grads(gated_act_reference, g.double(), u.double(), dh.double(), act)  # of the rounded inputs
    for what, o, t, exact in zip(("h", "dg", "du"), ours, torch_, truth):
        assert torch.isfinite(o).all()
        atol = 1e-6 * max(1.0, exact.abs().max().item())  # not less: torch's gelu tail alone is off by ~1e-8
        if dt == "float32":
            close(f"{name} {what} vs torch", o, t, 0, atol)
            close(f"{name} {what} vs fp64", o, exact.float(), 0, atol)
        else:
            once = grads(gated_act_reference, g.float(), u.float(), dh.float(), act)[("h", "dg", "du").index(what)]
            close(f"{name} {what} vs fp32 rounded once", o, once.bfloat16(), 2**-7, atol)
            close(f"{name} {what} vs torch bf16", o, t, 2**-6, atol)
    # elementwise: the block size changes nothing; the backward's h is the forward's, bit for bit
    assert torch.equal(res["h16"], res["h"])
    assert torch.equal(res["dgdu16"][0], res["dg"]) and torch.equal(res["dgdu16"][1], res["du"])
    assert all(torch.equal(a, b) for a, b in zip(res["dgduh16"], (res["dg"], res["du"], res["h"])))
    inplace, reused = res["inplace"]
    assert reused, "inplace=True must return g's, u's and dh's own storage"
    assert all(torch.equal(a, b) for a, b in zip(inplace, (res["dg"], res["du"], res["h"])))


def gated_lora_inputs(seed: int = 3):
    """(g, u, A, B) as leaves that require grad, a dense W [24, 40] and dy [6, 24], fp32."""
    gen = torch.Generator().manual_seed(seed)
    g, u = torch.randn(6, 40, generator=gen) * 3, torch.randn(6, 40, generator=gen)
    W, A, B = (torch.randn(shape, generator=gen) * 0.2 for shape in ((24, 40), (4, 40), (24, 4)))
    leaves = [t.requires_grad_() for t in (g, u, A, B)]
    return leaves, W, torch.randn(6, 24, generator=gen)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gated_lora_function(triton_out, act):
    """GatedLoRAFunction (act(g) * u, then the LoRA linear; h from the backward kernel) against LoRAFunction over
    the torch activation: output and the gradients of g, u, A and B."""
    from minilora.lora import LoRAFunction
    leaves, W, dy = gated_lora_inputs()
    y = LoRAFunction.apply(gated_act_reference(leaves[0], leaves[1], act), None, W, None, leaves[2], leaves[3], 0.5)
    y.backward(dy)
    for what, o, r in zip(("y", "dg", "du", "dA", "dB"), triton_out[f"gated_lora-{act}"], [y.detach()] +
                          [t.grad for t in leaves]):
        close(f"gated lora {act} {what}", o, r, 0, 1e-5 * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gated_lora_overwrite(triton_out, act):
    """overwrite=True (GatedMLP's call): the same output and gradients bit for bit, dg and du handed on in g's
    and u's own storage, and a second backward through the graph refused with an error naming retain_graph."""
    grads_, reused, second = triton_out[f"gated_lora_overwrite-{act}"]
    for what, o, r in zip(("y", "dg", "du", "dA", "dB"), grads_, triton_out[f"gated_lora-{act}"]):
        assert torch.equal(o, r), what
    assert reused
    assert "retain_graph" in second, second


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gated_lora_without_output(triton_out, act):
    """need_output=False (GatedMLP in a checkpoint's recompute): the gradients of g, u, A and B bit for bit, and
    the forward runs one product, xa = h Aᵀ [6, 4] (2 * 6 * 40 * 4 FLOPs), not x W₀ᵀ or xa Bᵀ."""
    grads_, flops = triton_out[f"gated_lora_no_output-{act}"]
    for what, o, r in zip(("dg", "du", "dA", "dB"), grads_, triton_out[f"gated_lora-{act}"][1:]):
        assert torch.equal(o, r), what
    assert flops == 2 * 6 * 40 * 4, flops


def test_expanded_grad_output(triton_out):
    g, u, _ = inputs("silu-float32-2x7x33")
    g = g.clone().requires_grad_()
    gated_act_reference(g, u, "silu").sum().backward()
    close("dg of h.sum()", triton_out["sum_dg"], g.grad, 0, 1e-6 * g.grad.abs().max().item())


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gradcheck_fp64(triton_out, act):
    assert triton_out[f"gradcheck-{act}"] is True, triton_out[f"gradcheck-{act}"]


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_saves_only_g_and_u(triton_out, act):
    numel_bytes = 3 * 5 * 4  # the [3, 5] fp32 g of the script
    print(f"{act}: saved bytes triton {triton_out[f'saved-triton-{act}']}, "
          f"reference {triton_out[f'saved-reference-{act}']}")
    assert triton_out[f"saved-triton-{act}"] == 2 * numel_bytes
    assert triton_out[f"saved-reference-{act}"] == 3 * numel_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_reference_is_torch_composition(act, dtype):
    gen = torch.Generator().manual_seed(2)
    g, u, dh = (torch.randn(4, 37, generator=gen).to(dtype) for _ in range(3))
    torch_act = F.silu if act == "silu" else (lambda x: F.gelu(x, approximate="tanh"))
    ref, composed = grads(gated_act_reference, g, u, dh, act), grads(lambda g, u, _: torch_act(g) * u, g, u, dh, act)
    for a, b in zip(ref, composed):
        assert torch.equal(a, b)
    # on the CPU the dispatch takes the reference
    for a, b in zip(grads(gated_act, g, u, dh, act), ref):
        assert torch.equal(a, b)


def test_bad_inputs():
    g = torch.randn(2, 3)
    with pytest.raises(ValueError, match="gelu_tanh") as e:
        gated_act(g, g, "gelu")
    assert "silu" in str(e.value)
    with pytest.raises(ValueError, match=r"g \(gate_proj output\).*\[2, 3\].*\[2, 4\]"):
        gated_act(g, torch.randn(2, 4), "silu")
    with pytest.raises(ValueError, match="dtype"):
        gated_act(g, g.bfloat16(), "silu")
    with pytest.raises(ValueError, match="floating point"):
        gated_act(g.int(), g.int(), "silu")
