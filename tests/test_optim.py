"""AdamW8bit against bitsandbytes' AdamW8bit (the oracle, on the CPU), against a per-tensor reference of the same
math, and against torch.optim.AdamW on a small regression.

bnb 0.50's CPU requantization reads the level from a 65536-bin table of [-1, 1] instead of searching the map
(csrc/cpu_ops.cpp), so its codes can be a neighbour of the nearest level; ours are the nearest, as bnb's CUDA
kernel's are. Everything else matches bit for bit: the maps, absmax, dequantization, and the params after a step
from equal states. The codes are checked against the exact nearest level (float64) and bnb's against the bound
its table allows."""
from __future__ import annotations

import io
import math

import pytest
import torch

from conftest import report
from minilora.optim import (
    BLOCK, STATE_BYTES_PER_ELEMENT, AdamW8bit, dequantize_blockwise, dynamic_map, quantize_blockwise, state_bytes,
    step_workspace_bytes,
)

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

# odd sizes: none a multiple of 256, one below 4096 (fp32 moments), one bf16, a matrix over several chunks
SHAPES = [(37, 301), (4101,), (10, 50), (300, 70), (5000,)]
DTYPES = [torch.float32, torch.float32, torch.float32, torch.float32, torch.bfloat16]
BNB_TABLE_BIN = 2 / 65535  # width of a bin of bnb's CPU quantization table


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(d)) for s, d in zip(SHAPES, DTYPES)]


def grads_for(step, skip=()):
    """Grads of step `step`, scales varying by tensor and step; None for the params in `skip`."""
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for i, (s, d) in enumerate(zip(SHAPES, DTYPES)):
        row_scale = torch.rand(s[0], *[1] * (len(s) - 1), generator=g)
        grad = torch.randn(s, generator=g) * (0.5 + i) * (1 + step % 3) * row_scale
        out.append(None if i in skip else grad.to(d))
    return out


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def nearest_error(x, codes, code):
    """float64 |x - level chosen| - |x - nearest level|, per element."""
    x, levels = x.double().reshape(-1, 1), code.double()
    chosen = (x[:, 0] - levels[codes.reshape(-1).long()]).abs()
    return chosen - (x - levels).abs().min(dim=1).values


def normalized(x, absmax):
    blocks = torch.nn.functional.pad(x.reshape(-1).float(), (0, absmax.numel() * BLOCK - x.numel())).view(-1, BLOCK)
    return (blocks / torch.where(absmax == 0, 1.0, absmax)[:, None]).view(-1)[:x.numel()]


def test_dynamic_maps_match_bnb():
    for signed in (True, False):
        assert torch.equal(dynamic_map(signed), F.create_dynamic_map(signed=signed))


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_quantize_matches_bnb(signed):
    """Block absmax and dequantization identical to bnb; our codes the nearest level (up to fp32 midpoints),
    bnb's CPU codes within its table's resolution. Odd size, blocks of very different scales, an all-zero block."""
    g = torch.Generator().manual_seed(0)
    n = 300 * BLOCK + 77
    x = torch.randn(n, generator=g) * torch.logspace(-6, 2, 301).repeat_interleave(BLOCK)[:n]
    x = x * x if not signed else x
    x[BLOCK:2 * BLOCK] = 0
    code = dynamic_map(signed)
    ours, absmax = quantize_blockwise(x, code)
    theirs, state = F.quantize_blockwise(x, code=code, blocksize=BLOCK)
    assert torch.equal(absmax, state.absmax)
    xn = normalized(x, absmax)
    live = absmax.repeat_interleave(BLOCK)[:x.numel()] > 0  # bnb codes an all-zero block from 0 / 0
    ours_err, theirs_err = nearest_error(xn, ours, code), nearest_error(xn, theirs, code)[live]
    report(f"codes vs bnb CPU ({(ours != theirs)[live].sum()} of {x.numel()} differ)", ours[live], theirs[live])
    print(f"distance beyond the nearest level: ours {ours_err.max():.3g}, bnb {theirs_err.max():.3g}")
    assert ours_err.max() <= 1e-7  # a midpoint in fp32 is off the real one by at most an ulp of 1
    assert theirs_err.max() <= BNB_TABLE_BIN + 1e-7
    assert (ours != theirs)[live].float().mean() < 0.05
    for codes in (ours, theirs):
        deq = dequantize_blockwise(codes, absmax, code)
        assert torch.equal(deq, F.dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=BLOCK))
    assert torch.equal(dequantize_blockwise(ours, absmax, code)[BLOCK:2 * BLOCK], torch.zeros(BLOCK))


def test_step_matches_bnb():
    """Each step starts both optimizers from bnb's state: params (fp32 and bf16, 8-bit and fp32 moments) and
    absmax must come out identical, codes as in test_quantize_matches_bnb. Also a LambdaLR schedule, and a
    param without a grad in two steps (both skip it). chunk_size 1024 cuts tensors across chunks."""
    ours_p, bnb_p = make_params(), make_params()
    ours = AdamW8bit(ours_p, lr=1e-2, weight_decay=0.1, chunk_size=1024)
    theirs = bnb.optim.AdamW8bit(bnb_p, lr=1e-2, weight_decay=0.1)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / 3) * 0.9 ** s)
                 for o in (ours, theirs)]
    signed, unsigned = dynamic_map(True), dynamic_map(False)
    mismatched = total = 0
    for step in range(8):
        grads = grads_for(step, skip={1} if step in (3, 4) else ())
        set_grads(ours_p, grads), set_grads(bnb_p, grads)
        before = {i: {k: v.clone() for k, v in theirs.state[p].items() if torch.is_tensor(v)}
                  for i, p in enumerate(bnb_p) if p in theirs.state}
        for i, (p, q) in enumerate(zip(ours_p, bnb_p)):  # start from bnb's state
            p.data.copy_(q.data)
            for k, v in before.get(i, {}).items():
                if k in ("state1", "state2", "absmax1", "absmax2"):
                    ours.state[p][k].copy_(v)
        ours.step(), theirs.step()
        for s in schedules:
            s.step()
        for i, (p, q) in enumerate(zip(ours_p, bnb_p)):
            a, b = ours.state[p], theirs.state[q]
            assert a["step"] == b["step"] == step + 1 - (i == 1 and step >= 3) - (i == 1 and step >= 4)
            assert torch.equal(p, q), f"step {step} param {i}: max diff {(p.float() - q.float()).abs().max()}"
            if grads[i] is None:
                continue
            if b["state1"].dtype == torch.float32:
                assert torch.equal(a["state1"], b["state1"]) and torch.equal(a["state2"], b["state2"])
                continue
            assert torch.equal(a["absmax1"], b["absmax1"]) and torch.equal(a["absmax2"], b["absmax2"])
            # the moments before requantization, from the shared state: ours must be their nearest levels
            moments = moments_from(before.get(i), grads[i], theirs.param_groups[0]["betas"])
            for key, absmax, code in (("state1", "absmax1", signed), ("state2", "absmax2", unsigned)):
                xn = normalized(moments[key], a[absmax])
                assert nearest_error(xn, a[key], code).max() <= 1e-7, f"step {step} param {i} {key}"
                assert nearest_error(xn, b[key], code).max() <= BNB_TABLE_BIN + 1e-7
                mismatched += (a[key] != b[key]).sum().item()
                total += a[key].numel()
    print(f"codes differing from bnb CPU's table lookup: {mismatched} of {total}")
    assert mismatched < 0.05 * total


def test_free_running_close_to_bnb():
    """20 steps each on its own (no state sharing): the params drift apart only through the codes where bnb's
    table lookup and the nearest level differ (a few %, each a level or a few away near 0). Each step moves a param
    by ~lr: the mean drift must stay under 1% of the mean distance travelled (measured: 0.06%), the largest under
    a quarter of lr * steps (measured: 6%, an element whose v sits near 0, where bnb's table is coarse)."""
    ours_p, bnb_p = make_params(5), make_params(5)
    ours, theirs = AdamW8bit(ours_p, lr=1e-3), bnb.optim.AdamW8bit(bnb_p, lr=1e-3)
    start = [p.detach().float().clone() for p in ours_p]
    for step in range(20):
        grads = grads_for(step)
        set_grads(ours_p, grads), set_grads(bnb_p, grads)
        ours.step(), theirs.step()
    for i, (p, q, p0) in enumerate(zip(ours_p, bnb_p, start)):
        mx, mean = report(f"param {i} {tuple(p.shape)} {p.dtype} after 20 steps, ours vs bnb", p.float(), q.float())
        travelled = (q.float() - p0).abs().mean().item()
        print(f"  mean distance travelled {travelled:.3g}")
        assert mean < 0.01 * travelled and mx < 0.25 * 1e-3 * 20


def moments_from(state, grad, betas):
    """fp32 m and v after this step's moment update, from bnb's 8-bit state before it (bnb's own dequantization;
    None: a fresh state)."""
    g = grad.float()
    if state is None:
        m, v = torch.zeros_like(g), torch.zeros_like(g)
    else:
        m = F.dequantize_blockwise(state["state1"], absmax=state["absmax1"], code=dynamic_map(True), blocksize=BLOCK)
        v = F.dequantize_blockwise(state["state2"], absmax=state["absmax2"], code=dynamic_map(False), blocksize=BLOCK)
    m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
    v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
    return {"state1": m, "state2": v}


def reference_step(p, grad, st, lr, betas, eps, weight_decay, min_8bit_size=4096):
    """Per-tensor 8-bit AdamW, straight from the formula (dequantize, fp32 AdamW, requantize), for one param."""
    if grad is None:
        return
    quantized = p.numel() >= min_8bit_size
    if not st:
        st.update(step=0, m=torch.zeros(p.shape), v=torch.zeros(p.shape))
        if quantized:
            st["m"], st["a1"] = quantize_blockwise(st.pop("m"), dynamic_map(True))
            st["v"], st["a2"] = quantize_blockwise(st.pop("v"), dynamic_map(False))
    st["step"] += 1
    t, g, x = st["step"], grad.float(), p.detach().float()
    m = dequantize_blockwise(st["m"], st["a1"], dynamic_map(True)) if quantized else st["m"]
    v = dequantize_blockwise(st["v"], st["a2"], dynamic_map(False)) if quantized else st["v"]
    m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
    v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
    c1, c2 = 1 - betas[0] ** t, math.sqrt(1 - betas[1] ** t)
    x.mul_(1 - lr * weight_decay)
    if quantized:
        x.addcdiv_(m, (v.sqrt() / c2).add_(eps), value=-lr / c1)
        st["m"], st["a1"] = quantize_blockwise(m, dynamic_map(True))
        st["v"], st["a2"] = quantize_blockwise(v, dynamic_map(False))
    else:
        x.add_(m / (v.sqrt() + eps * c2), alpha=-lr * c2 / c1)
    p.data.copy_(x)


@pytest.mark.parametrize("chunk_size", [512, 1 << 22])
def test_flat_buffers_match_per_tensor_reference(chunk_size):
    """Free-running, 10 steps: chunks that cut tensors, padding, a param skipped in some steps (so the group steps
    in several runs with different bias corrections), two param groups; bit-identical to the per-tensor loop."""
    ours_p, ref_p = make_params(1), make_params(1)
    hp = [dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
          dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0)]
    opt = AdamW8bit([dict(params=ours_p[:3], **hp[0]), dict(params=ours_p[3:], **hp[1])], chunk_size=chunk_size)
    ref_state = [{} for _ in ref_p]
    for step in range(10):
        skip = {0} if step in (2, 3, 7) else {3} if step == 5 else set()
        grads = grads_for(step, skip)
        frozen = [p.detach().clone() for p in ours_p]
        set_grads(ours_p, grads)
        opt.step()
        for i, (p, grad) in enumerate(zip(ref_p, grads)):
            reference_step(p, grad, ref_state[i], **hp[0 if i < 3 else 1])
        for i, (p, q) in enumerate(zip(ours_p, ref_p)):
            assert torch.equal(p, q), f"step {step} param {i}: max diff {report('param', p, q)[0]}"
            if i in skip:
                assert torch.equal(p, frozen[i])
            st, ref = opt.state[p], ref_state[i]
            assert st["step"] == ref["step"]
            assert torch.equal(st["state1"], ref["m"]) and torch.equal(st["state2"], ref["v"])
            if "a1" in ref:
                assert torch.equal(st["absmax1"], ref["a1"]) and torch.equal(st["absmax2"], ref["a2"])


def test_converges_like_torch_adamw():
    """Least squares Y = X W, W [96, 64] (8-bit moments), 60 steps, lr 1e-2: against torch.optim.AdamW.

    The tolerance: an Adam step moves an element by about lr at most, so after n steps the two runs are at most
    ~2 lr n apart. An 8-bit moment is off by half a level spacing: ~1% of the value near its block's absmax, up
    to tens of % for values a decade or more below it, and the update of that element moves by a similar
    fraction of lr. Measured here: mean drift ~2% of lr n, the largest ~13%; we allow 5% and 25%."""
    g = torch.Generator().manual_seed(0)
    x, w_true = torch.randn(512, 96, generator=g), torch.randn(96, 64, generator=g)
    y = x @ w_true + 0.01 * torch.randn(512, 64, generator=g)
    w8, w32 = (torch.nn.Parameter(torch.zeros(96, 64)) for _ in range(2))
    opt8, opt32 = AdamW8bit([w8], lr=1e-2), torch.optim.AdamW([w32], lr=1e-2)
    steps, losses = 60, []
    for _ in range(steps):
        for w, opt in ((w8, opt8), (w32, opt32)):
            loss = ((x @ w - y) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    l8, l32 = losses[-2], losses[-1]
    mx, mean = report("W after 60 steps, 8-bit vs fp32 AdamW", w8, w32)
    print(f"loss {losses[0]:.4f} -> 8-bit {l8:.4f}, fp32 {l32:.4f}")
    assert mean < 0.05 * 1e-2 * steps and mx < 0.25 * 1e-2 * steps
    assert abs(l8 - l32) < 0.02 * l32 and l8 < 0.5 * losses[0]


def test_state_dict_round_trip():
    """Save after 3 steps (through torch.save, loaded on the CPU as the trainer does), load into a fresh
    optimizer over copies of the params, take 3 more steps on both: bit-identical params and state."""
    ours_p = make_params(2)
    opt = AdamW8bit(ours_p, lr=1e-2, chunk_size=1024)
    for step in range(3):
        set_grads(ours_p, grads_for(step, skip={2} if step == 1 else ()))
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    assert len(buf.getvalue()) < state_bytes(p.numel() for p in ours_p) + 20_000  # views saved once, no copies
    buf.seek(0)
    new_p = [torch.nn.Parameter(p.detach().clone()) for p in ours_p]
    new = AdamW8bit(new_p, lr=123.0, chunk_size=BLOCK)  # lr comes back from the state dict
    new.load_state_dict(torch.load(buf, map_location="cpu", weights_only=True))
    assert new.param_groups[0]["lr"] == 1e-2
    for p, q in zip(ours_p, new_p):  # fp32 absmax and moments of the bf16 param stay fp32
        assert {k: v.dtype for k, v in opt.state[p].items() if torch.is_tensor(v)} == \
            {k: v.dtype for k, v in new.state[q].items() if torch.is_tensor(v)}
    for step in range(3, 6):
        grads = grads_for(step)
        set_grads(ours_p, grads), set_grads(new_p, grads)
        opt.step(), new.step()
    for p, q in zip(ours_p, new_p):
        assert torch.equal(p, q)
        a, b = opt.state[p], new.state[q]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
                                            for k in a)


def test_loads_bnb_state_dict():
    """A bnb AdamW8bit checkpoint resumes here: after loading its state dict, the next step gives bnb's params."""
    ours_p, bnb_p = make_params(4), make_params(4)
    theirs = bnb.optim.AdamW8bit(bnb_p, lr=1e-2)
    for step in range(3):
        set_grads(bnb_p, grads_for(step))
        theirs.step()
    ours = AdamW8bit(ours_p)
    ours.load_state_dict(theirs.state_dict())
    for p, q in zip(ours_p, bnb_p):
        p.data.copy_(q.data)
    grads = grads_for(3)
    set_grads(ours_p, grads), set_grads(bnb_p, grads)
    ours.step(), theirs.step()
    for p, q in zip(ours_p, bnb_p):
        assert torch.equal(p, q) and ours.state[p]["step"] == theirs.state[q]["step"] == 4


def test_grad_scaler_and_skipped_params():
    """Through torch.amp.GradScaler (the trainer's path): a scaled step equals a plain one; an inf gradient skips
    the step. A param without a grad keeps its value and state, as with torch.optim.AdamW (decay included)."""
    a, b = make_params(3), make_params(3)
    opt_a, opt_b = AdamW8bit(a, lr=1e-2), AdamW8bit(b, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # creates the scale; our grads below are pre-scaled by hand
    for step in range(3):
        grads = grads_for(step, skip={4} if step == 2 else ())
        set_grads(a, grads)
        set_grads(b, [None if g is None else g.float().mul(1024.0).to(g.dtype) for g in grads])
        frozen = (b[4].detach().clone(), opt_b.state[b[4]]["state1"].clone()) if step == 2 else None
        opt_a.step()
        scaler.step(opt_b)
        scaler.update()
        if frozen is not None:
            assert torch.equal(b[4], frozen[0]) and torch.equal(opt_b.state[b[4]]["state1"], frozen[1])
            assert opt_b.state[b[4]]["step"] == 2
    for p, q in zip(a, b):  # bf16 grads scaled by 2^10 and back are exact
        assert torch.equal(p, q)
    before = [p.detach().clone() for p in b]
    set_grads(b, [torch.full(p.shape, math.inf, dtype=p.dtype) for p in b])
    scaler.step(opt_b)
    assert all(torch.equal(p, q) for p, q in zip(b, before))


def test_state_bytes():
    params = make_params()
    opt = AdamW8bit(params)
    set_grads(params, grads_for(0))
    opt.step()
    storages = {}
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                storages[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    assert sum(storages.values()) == state_bytes(p.numel() for p in params)
    assert state_bytes([BLOCK * 164_063]) == BLOCK * 164_063 * STATE_BYTES_PER_ELEMENT  # 42M, whole blocks
    assert state_bytes([4095]) == 4096 * 8  # fp32 moments below min_8bit_size
    assert step_workspace_bytes([42_000_000]) < 100 * 2**20


def test_errors():
    with pytest.raises(TypeError, match="param 0 of group 0 is torch.int64"):
        AdamW8bit([torch.zeros(3, dtype=torch.long)])
    with pytest.raises(ValueError, match="invalid betas"):
        AdamW8bit([torch.nn.Parameter(torch.zeros(3))], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="chunk_size"):
        AdamW8bit([torch.nn.Parameter(torch.zeros(3))], chunk_size=1000)
    p = torch.nn.Parameter(torch.zeros(5000))
    p.grad = torch.zeros(5000).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradient"):
        AdamW8bit([p]).step()
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (100, 5000)]
    params[1].grad = torch.ones(5000)
    opt = AdamW8bit(params)
    opt.step()
    other = [torch.nn.Parameter(torch.zeros(n)) for n in (100, 8000)]
    with pytest.raises(ValueError, match="state 'state1' of param 0.1 is torch.uint8 \\(5000,\\)"):
        AdamW8bit(other).load_state_dict(opt.state_dict())
    p, q = torch.nn.Parameter(torch.zeros(10)), torch.nn.Parameter(torch.zeros(5000))
    q.grad = torch.zeros(5000).to_sparse()
    with pytest.raises(RuntimeError, match="param 0.1 has a sparse gradient"):
        AdamW8bit([p, q]).step()


# --- the Triton step (kernels/adamw8bit.py), run by Triton's interpreter on the CPU -------------------------------
KERNEL_SCRIPT = """
import sys
import torch
sys.path.insert(0, sys.argv[2])
from test_optim import grads_for, make_params, set_grads
from minilora.optim import AdamW8bit


class KernelAdamW8bit(AdamW8bit):
    launches = 0

    def _use_kernel(self, pack, first, end):  # the kernel's path on CPU tensors too (the interpreter runs it)
        use = pack.quantized and all(p.grad.dtype == p.dtype for p in pack.params[first:end])
        KernelAdamW8bit.launches += use
        return use


ref_p = make_params()
ref = AdamW8bit(ref_p, lr=1e-2, weight_decay=0.1, chunk_size=1024)
out = []
for step in range(4):
    grads = grads_for(step, skip={1} if step in (1, 2) else ())  # param 1 falls behind: two runs, two step counts
    if step == 3:
        grads[3] = grads[3].t().contiguous().t()  # a non-contiguous grad
    ours_p = [torch.nn.Parameter(p.detach().clone()) for p in ref_p]
    ours = KernelAdamW8bit(ours_p, lr=1e-2, weight_decay=0.1)
    if step:
        ours.load_state_dict(ref.state_dict())  # both step from the same params and state
    set_grads(ours_p, grads), set_grads(ref_p, grads)
    versions = [p._version for p in ours_p]
    ours.step(), ref.step()
    state = lambda opt, ps: [{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()} for p in ps]
    out.append(dict(ours=[p.detach().clone() for p in ours_p], ref=[p.detach().clone() for p in ref_p],
                    ours_state=state(ours, ours_p), ref_state=state(ref, ref_p), launches=KernelAdamW8bit.launches,
                    stepped=[g is not None for g in grads],
                    bumped=[p._version > v for p, v in zip(ours_p, versions)]))
torch.save(out, sys.argv[1])
"""


def test_triton_step_matches_reference(tmp_path):
    """The kernel against the torch step, each step from equal params and state: fp32 and bf16 params (8-bit
    moments; the fp32-moment param takes the torch path in both), a param without a grad for two steps (the step
    runs as two ranges of the flat state), a non-contiguous grad. fp32 params within 1e-6 of their scale; bf16
    within one ulp (the interpreter truncates to bf16 where torch rounds); absmax equal to ~1 ulp; a code may
    differ only where the scaled moment sits within an fp32 rounding of a midpoint (one level)."""
    from conftest import run_interpreted
    steps = run_interpreted(KERNEL_SCRIPT, tmp_path / "out.pt")
    # launches so far: the fp32 pack (params 0, 1, 3) and the bf16 one (param 4) a step; while param 1 has no
    # grad the fp32 pack runs as [0] and [3], and after it, with its step count behind, as [0], [1], [3]
    assert [res["launches"] for res in steps] == [2, 5, 8, 12]
    for t, res in enumerate(steps):
        # the kernel writes params through their addresses; the step bumps their version counters itself, as an
        # in-place torch op would (minilora.lora.CastCache remakes its casts by them)
        assert res["bumped"] == res["stepped"], t
        for i, (o, r, os_, rs) in enumerate(zip(res["ours"], res["ref"], res["ours_state"], res["ref_state"])):
            assert os_["step"] == rs["step"], (t, i)
            mx, _ = report(f"step {t} param {i} ({o.dtype}, {tuple(o.shape)})", o, r)
            scale = r.float().abs().max().item()
            assert mx <= (scale * 2 ** -7 if o.dtype == torch.bfloat16 else 1e-6 * scale), (t, i)
            for key in ("absmax1", "absmax2"):
                if key in rs:
                    torch.testing.assert_close(os_[key], rs[key], rtol=1e-6, atol=0)
            for key in ("state1", "state2"):
                if rs[key].dtype == torch.uint8:
                    d = (os_[key].int() - rs[key].int()).abs()
                    assert d.max() <= 1 and (d > 0).float().mean() < 1e-3, (t, i, key, (d > 0).sum())
                else:
                    torch.testing.assert_close(os_[key], rs[key], rtol=1e-6, atol=1e-12)
