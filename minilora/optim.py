"""8-bit AdamW: bitsandbytes' `bnb.optim.AdamW8bit` in plain PyTorch, stepping a whole param group at once.

Adam keeps two moments per trainable element, m (exp_avg) and v (exp_avg_sq): 8 bytes in fp32. Here each moment
is one byte, the index of a level in a 256-entry "dynamic" map, scaled by an fp32 absmax shared by a block of 256
consecutive elements of one tensor (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization",
arXiv:2110.02861). That is 2 + 2*4/256 = 2.03 bytes a trainable element instead of 8; for the 42M LoRA elements
of an 8B model, 85 MB instead of 336 MB. One step, for each element of a tensor at its step t:

    m = SIGNED[c1]   * absmax1[block]            v = UNSIGNED[c2] * absmax2[block]          dequantize
    m = b1 m + (1 - b1) g                        v = b2 v + (1 - b2) g^2
    p = p (1 - lr wd)  -  lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)          decoupled decay first
    absmax1[block] = max |m|,  c1 = nearest level of SIGNED to m / absmax1[block]            requantize (same for v)

SIGNED and UNSIGNED are bnb's `create_dynamic_map(signed=True / False)` (`dynamic_map`): levels spread over the
decades 1e-7 .. 1, so moments far below their block's absmax keep ~1-2 significant digits. Tensors of fewer than
MIN_8BIT_SIZE (4096) elements keep fp32 m and v, as bnb's `min_8bit_size` does. State keys and shapes are bnb's:
`step` (int), `state1`, `state2` (uint8 codes shaped like the param, or fp32 moments), `absmax1`, `absmax2`
(fp32 [ceil(numel / 256)]).

Speed: a LoRA model has hundreds of small tensors (448 for an 8B model), and a per-tensor loop of ~25 ops each
would be ~11k kernel launches a step. Instead a group's 8-bit tensors of one dtype share flat buffers, each
tensor's segment padded to whole blocks (so no block straddles two tensors and the blocks are bnb's per-tensor
blocks):

    params     A0 [16, 4096]        B0 [4096, 16]        A1 [16, 4096]   ...      bias [500]
    8-bit      |A0 .......|B0 .......|A1 .......| ...    state1, state2 uint8 [N], absmax1, absmax2 fp32 [N/256]
    fp32                                                 |bias|pad|               state1, state2 fp32 [N']

and the step walks them in chunks of `chunk_size` elements (2^22): gather the chunk's grads and params into fp32
buffers (`torch._foreach_copy_`), dequantize, do the math, requantize and write the params back: 35 kernels a
chunk, 350 a step for 42M elements. On CUDA an 8-bit pack takes one launch instead (kernels/adamw8bit.py, which
reads the params and grads in place): the 350 launches spread ~5 ms of kernels over ~18 ms. The per-tensor
state entries are views into the flat buffers, so `state_dict` sees bnb's layout (and `torch.save` writes each
buffer once).

Where this differs from bitsandbytes 0.50 (all at the level of fp32 rounding):
- Rounding to the nearest level compares against fp32 midpoints of the map, as bnb's CUDA kernel does
  (`quantize_2D` in csrc/cuda/optimizers.cu). bnb's CPU kernel reads the level from a table of 65536 bins of
  [-1, 1], so it can pick a neighbour of the nearest level (several levels off near 0, where levels are closer
  than a bin); tests/test_optim.py counts those.
- Decay before the Adam update, as torch.optim.AdamW and bnb's CPU and Triton paths; bnb's CUDA kernel decays
  after it, a difference of lr * wd * lr * update a step. Denominators are written as bnb's CPU paths write
  them (8-bit: sqrt(v) / sqrt(1 - b2^t) + eps; fp32: sqrt(v) + eps sqrt(1 - b2^t)), so on the CPU a step from
  equal states gives bit-identical params.
- bnb's CUDA kernel moves a negative m that rounds to the level 0.0 one level down (keeping its sign), and zeroes
  the moments of non-finite grads. Neither is done here (the trainer never steps on a non-finite gradient).
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from minilora.kernels import use_triton
from minilora.kernels.adamw8bit import BLOCK, adamw8bit_step_triton, block_tables  # BLOCK: bnb's 256

OPTIMIZERS = ("adamw", "adamw_8bit")  # the trainer's choices: torch's AdamW (fp32 moments), or AdamW8bit below
MIN_8BIT_SIZE = 4096  # smaller tensors keep fp32 moments (bnb: min_8bit_size)
CHUNK_SIZE = 1 << 22  # elements stepped at once: ~20 bytes of fp32 temporaries each, 80 MiB (step_workspace_bytes)
# optimizer state per element of a tensor with 8-bit moments: two codes + two fp32 absmax per 256 elements
STATE_BYTES_PER_ELEMENT = 2 + 2 * 4 / BLOCK  # 2.03125 (fp32 moments: 8)
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --- the dynamic maps and blockwise (de)quantization -------------------------------------------------------------
def dynamic_map(signed: bool) -> Tensor:
    """fp32 [256], sorted: bnb's `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`.

    For e = 0..6 the levels 10^(e-6) * mid, `mid` the midpoints of equal steps of [0.1, 1] (2^e steps signed, with
    both signs; 2^(e+1) unsigned), plus 0 and 1: 10^-7 .. 1 with ~2-3 significant digits each. Built with the same
    fp32 torch ops as bnb, so the levels are the same floats."""
    data: list[float] = []
    for e in range(7):
        steps = 2 ** e if signed else 2 ** (e + 1)
        bounds = torch.linspace(0.1, 1, steps + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (e - 6)) * means).tolist()
        if signed:
            data += (-(10 ** (e - 6)) * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256, len(data)
    return torch.tensor(sorted(data), dtype=torch.float32)


def _midpoints(code: Tensor) -> Tensor:
    """fp32 [255]: x rounds to level i + 1 when x > midpoint i (bnb CUDA: `(upper + val) * 0.5f`)."""
    return (code[1:] + code[:-1]) * 0.5


def _dequantize(codes: Tensor, absmax: Tensor, code: Tensor) -> Tensor:
    """fp32 [n] from uint8 codes [n] and absmax [n / BLOCK]: code[c] * absmax[block], n a multiple of BLOCK."""
    out = code.index_select(0, codes.int())  # (uint8 would index as a mask)
    return out.view(-1, BLOCK).mul_(absmax[:, None]).view(-1)


def _quantize_(x: Tensor, mids: Tensor, codes_out: Tensor, absmax_out: Tensor) -> None:
    """Write the codes of x [n] (n a multiple of BLOCK) into codes_out [n] and its block absmax into absmax_out.
    Divides x in place: it is a temporary of the step."""
    blocks = x.view(-1, BLOCK)
    lo, hi = torch.aminmax(blocks, dim=1)  # max |x| without an |x| temporary of n floats
    torch.maximum(hi, lo.neg_(), out=absmax_out)
    blocks.div_(torch.where(absmax_out == 0, 1.0, absmax_out)[:, None])  # an all-zero block codes the level 0.0
    codes_out.copy_(torch.bucketize(x, mids, out_int32=True))


def quantize_blockwise(x: Tensor, code: Tensor) -> tuple[Tensor, Tensor]:
    """uint8 codes shaped like x and fp32 absmax [ceil(numel / 256)] of x in blocks of 256 consecutive elements:
    bnb's `quantize_blockwise(x, code, blocksize=256)` with exact nearest-level rounding."""
    flat = x.detach().reshape(-1).float()
    n, padded = flat.numel(), _round_up(flat.numel(), BLOCK)
    work = torch.zeros(padded, dtype=torch.float32, device=x.device)
    work[:n] = flat
    codes = torch.empty(padded, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(padded // BLOCK, dtype=torch.float32, device=x.device)
    _quantize_(work, _midpoints(code.to(x.device)), codes, absmax)
    return codes[:n].view(x.shape), absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, code: Tensor) -> Tensor:
    """fp32 shaped like codes: code[codes] * absmax[block] (bnb's `dequantize_blockwise`, blocksize=256)."""
    n = codes.numel()
    padded = torch.zeros(_round_up(n, BLOCK), dtype=torch.uint8, device=codes.device)
    padded[:n] = codes.reshape(-1)
    return _dequantize(padded, absmax, code.to(codes.device))[:n].view(codes.shape)


# --- memory ------------------------------------------------------------------------------------------------------
def state_bytes(numels: Iterable[int], min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """Bytes of optimizer state AdamW8bit allocates for trainable tensors of these sizes (padding included):
    ~STATE_BYTES_PER_ELEMENT a trainable element, 8 for tensors below min_8bit_size."""
    total = 0
    for n in numels:
        padded = _round_up(n, BLOCK)
        total += padded * 2 + padded // BLOCK * 8 if n >= min_8bit_size else padded * 8
    return total


def step_workspace_bytes(numels: Iterable[int], chunk_size: int = CHUNK_SIZE) -> int:
    """Peak bytes of temporaries during `step()`: at most five fp32 buffers of one chunk are alive at once
    (grads, params, m, v and an index or denominator), plus a per-block absmax or two."""
    largest = min(chunk_size, sum(_round_up(n, BLOCK) for n in numels))
    return 20 * largest + 16 * (largest // BLOCK)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# --- the optimizer -----------------------------------------------------------------------------------------------
BNB_WRAPPED_KEY = "__bnb_optimizer_quant_state__"  # bnb's state_dict nests a param's state tensors under this key


def _from_bnb(state: dict, maps: tuple[Tensor, Tensor]) -> dict:
    """A param's state from bnb AdamW8bit's state_dict: unnested, its maps checked against ours (signed, unsigned)
    and dropped. Our own state dicts pass through."""
    state = {**state, **state.get(BNB_WRAPPED_KEY, {})}
    state.pop(BNB_WRAPPED_KEY, None)
    for key, code in zip(("qmap1", "qmap2"), maps):
        if key in state and not torch.equal(state.pop(key).cpu(), code):
            raise ValueError(f"AdamW8bit: the state dict's {key} is not bnb's dynamic map")
    return state


@dataclass
class _Pack:
    """The params of one group that share a state format and dtype, end to end in flat buffers; param i owns
    elements [offsets[i], offsets[i] + numel) and its padding up to offsets[i + 1] (both multiples of BLOCK)."""
    params: list[Tensor]
    index: list[int]  # of each param in its group (for messages)
    offsets: list[int]  # len(params) + 1
    state1: Tensor  # [N] uint8 codes of m, or fp32 m
    state2: Tensor  # [N] uint8 codes of v, or fp32 v
    absmax1: Tensor | None = None  # [N / BLOCK] fp32, 8-bit packs only
    absmax2: Tensor | None = None
    maps: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # signed, its midpoints, unsigned, its midpoints
    tables: tuple[Tensor, Tensor, Tensor] | None = None  # the kernel's numels, blk_param, blk_elem (made on use)

    @property
    def quantized(self) -> bool:
        return self.absmax1 is not None


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with blockwise 8-bit moments, bnb's AdamW8bit semantics (formula and differences: module docstring).
    Param groups, LR schedulers (they edit group["lr"]), GradScaler and state_dict / load_state_dict work as with
    torch.optim.AdamW; `min_8bit_size` and `chunk_size` are per optimizer. Unlike torch, the first step creates
    the state of every param of a group (step 0 for those without a grad yet): they share its flat buffers."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, min_8bit_size: int = MIN_8BIT_SIZE, chunk_size: int = CHUNK_SIZE):
        if chunk_size <= 0 or chunk_size % BLOCK:
            raise ValueError(f"AdamW8bit: chunk_size must be a positive multiple of {BLOCK}, got {chunk_size}")
        self.min_8bit_size, self.chunk_size = min_8bit_size, chunk_size
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._packs: list[tuple[list[int], list[_Pack]]] = []  # per group: ids of its params, its packs

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        gi, group = len(self.param_groups) - 1, self.param_groups[-1]
        beta1, beta2 = group["betas"]
        for name, ok in (("lr", group["lr"] >= 0), ("eps", group["eps"] >= 0),
                         ("betas", 0 <= beta1 < 1 and 0 <= beta2 < 1), ("weight_decay", group["weight_decay"] >= 0)):
            if not ok:
                raise ValueError(f"AdamW8bit: param group {gi} has invalid {name} {group[name]}")
        for i, p in enumerate(group["params"]):
            if p.dtype not in PARAM_DTYPES:
                raise TypeError(f"AdamW8bit: param {i} of group {gi} is {p.dtype}; it steps "
                                f"{', '.join(str(d) for d in PARAM_DTYPES)} params")

    # --- packing: per-param state <-> flat buffers -----------------------------------------------------------------
    def _group_packs(self, gi: int) -> list[_Pack]:
        """The group's packs, (re)built when its params changed (first step, add_param_group, load_state_dict)."""
        ids = [id(p) for p in self.param_groups[gi]["params"]]
        while len(self._packs) <= gi:
            self._packs.append(([], []))
        if self._packs[gi][0] != ids:
            self._packs[gi] = (ids, self._build_packs(gi))
        return self._packs[gi][1]

    def _build_packs(self, gi: int) -> list[_Pack]:
        params = self.param_groups[gi]["params"]
        for i, p in enumerate(params):
            if not p.is_contiguous():
                raise ValueError(f"AdamW8bit: param {i} of group {gi} is not contiguous (its update is written back "
                                 f"through a flat view); make it contiguous before creating the optimizer")
            if p.device != params[0].device:
                raise ValueError(f"AdamW8bit: param {i} of group {gi} is on {p.device}, param 0 on "
                                 f"{params[0].device}; put a group's params on one device")
        # one pack per state format and param dtype (the kernel reads one dtype), in order of first appearance
        kinds = [(self._is_8bit(p), p.dtype) for p in params]
        return [self._build_pack(gi, [i for i, k in enumerate(kinds) if k == kind], kind[0])
                for kind in dict.fromkeys(kinds)]

    def _is_8bit(self, p: Tensor) -> bool:
        """A loaded state keeps its format (bnb decides by state1's dtype too); a new one goes by size."""
        state1 = self.state[p].get("state1") if p in self.state else None
        return state1.dtype == torch.uint8 if state1 is not None else p.numel() >= self.min_8bit_size

    def _build_pack(self, gi: int, index: list[int], quantized: bool) -> _Pack:
        params = [self.param_groups[gi]["params"][i] for i in index]
        offsets = [0]
        for p in params:
            offsets.append(offsets[-1] + _round_up(p.numel(), BLOCK))
        n, dev = offsets[-1], params[0].device
        dtype = torch.uint8 if quantized else torch.float32
        pack = _Pack(params, index, offsets, torch.zeros(n, dtype=dtype, device=dev),
                     torch.zeros(n, dtype=dtype, device=dev))
        if quantized:
            signed, unsigned = dynamic_map(True), dynamic_map(False)
            # padding must decode to 0 whatever its block's absmax (it counts in the block's max |m|): code 0 of
            # the signed map is -0.993, its 0.0 is code 127 (the unsigned map's is code 0)
            pack.state1.fill_(int((signed == 0).nonzero()))
            signed, unsigned = signed.to(dev), unsigned.to(dev)
            pack.maps = (signed, _midpoints(signed), unsigned, _midpoints(unsigned))
            pack.absmax1 = torch.zeros(n // BLOCK, dtype=torch.float32, device=dev)
            pack.absmax2 = torch.zeros(n // BLOCK, dtype=torch.float32, device=dev)
        for p, i, lo in zip(params, index, offsets):
            views = {"state1": pack.state1[lo:lo + p.numel()].view(p.shape),
                     "state2": pack.state2[lo:lo + p.numel()].view(p.shape)}
            if quantized:
                blocks = slice(lo // BLOCK, lo // BLOCK + _round_up(p.numel(), BLOCK) // BLOCK)
                views |= {"absmax1": pack.absmax1[blocks], "absmax2": pack.absmax2[blocks]}
            old = self.state[p]
            for key, view in views.items():
                if key in old:  # a loaded state, or the views of an older pack: copy it in
                    if old[key].numel() != view.numel() or old[key].dtype != view.dtype:
                        raise ValueError(f"AdamW8bit: state {key!r} of param {gi}.{i} is "
                                         f"{old[key].dtype} {tuple(old[key].shape)}, expected {view.dtype} "
                                         f"{tuple(view.shape)}; the state was saved for other params")
                    view.copy_(old[key].reshape(view.shape))
            old.update(views)
            old.setdefault("step", 0)
        return pack

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim.Optimizer's, except that state tensors keep their dtype: torch casts every floating-point
        state to its param's dtype, which would round the fp32 absmax and moments of a bf16 param. Also reads
        the state dict of a bnb AdamW8bit."""
        maps = dynamic_map(True), dynamic_map(False)
        saved = {k: _from_bnb(s, maps) for k, s in state_dict["state"].items()}
        tensors = {k: {n: t for n, t in s.items() if torch.is_tensor(t)} for k, s in saved.items()}
        super().load_state_dict({**state_dict, "state": {
            k: {n: v for n, v in s.items() if not torch.is_tensor(v)} for k, s in saved.items()}})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for key, p in zip(saved_ids, (p for g in self.param_groups for p in g["params"])):
            self.state[p].update(tensors.get(key, {}))
        self._packs = []
        for gi in range(len(self.param_groups)):  # copies the loaded tensors into device buffers now
            self._group_packs(gi)

    # --- the step ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            for pack in self._group_packs(gi):
                for first, end, t in self._runs(gi, pack):
                    self._step_range(pack, group, first, end, t)
                    for p in pack.params[first:end]:
                        self.state[p]["step"] = t
        return loss

    def _runs(self, gi: int, pack: _Pack) -> list[tuple[int, int, int]]:
        """(first, end, step) for each run of consecutive params that have a grad and the same next step count:
        all of them in one run, unless some param had no grad in this or an earlier step (skipped like AdamW)."""
        runs: list[tuple[int, int, int]] = []
        for i, p in enumerate(pack.params):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"AdamW8bit: param {gi}.{pack.index[i]} has a sparse gradient; AdamW8bit needs "
                                   f"dense ones")
            if p.grad.shape != p.shape:
                raise RuntimeError(f"AdamW8bit: param {gi}.{pack.index[i]} has shape {tuple(p.shape)} but its grad "
                                   f"{tuple(p.grad.shape)}")
            t = self.state[p]["step"] + 1
            if runs and runs[-1][1] == i and runs[-1][2] == t:
                runs[-1] = (runs[-1][0], i + 1, t)
            else:
                runs.append((i, i + 1, t))
        return runs

    def _use_kernel(self, pack: _Pack, first: int, end: int) -> bool:
        """The Triton step (kernels/adamw8bit.py) for 8-bit packs on CUDA whose grads have their params' dtype."""
        return (pack.quantized and use_triton(pack.state1, "adamw8bit")
                and all(p.grad.dtype == p.dtype for p in pack.params[first:end]))

    def _step_range(self, pack: _Pack, group: dict, first: int, end: int, t: int) -> None:
        """One step of params first..end-1 of the pack (consecutive, so one range of the flat buffers)."""
        if self._use_kernel(pack, first, end):
            return self._step_range_triton(pack, group, first, end, t)
        grads = [p.grad.reshape(-1) for p in pack.params[first:end]]
        flats = [p.view(-1) for p in pack.params[first:end]]
        start, stop = pack.offsets[first], pack.offsets[end]
        for lo in range(start, stop, self.chunk_size):
            hi = min(lo + self.chunk_size, stop)
            # the chunk's pieces of params, and its split into [padding, piece, padding, piece, ..., padding]
            g_src, p_src, sizes, at = [], [], [], lo
            for i in range(bisect.bisect_right(pack.offsets, lo) - 1, end):
                off, n = pack.offsets[i], pack.params[i].numel()
                if off >= hi:
                    break
                a, b = max(lo, off), min(hi, off + n)
                if a >= b:
                    continue
                sizes += [a - at, b - a]
                at = b
                whole = b - a == n  # most are: slice only the params a chunk boundary cuts
                g_src.append(grads[i - first] if whole else grads[i - first][a - off:b - off])
                p_src.append(flats[i - first] if whole else flats[i - first][a - off:b - off])
            self._step_chunk(pack, group, lo, hi, t, g_src, p_src, sizes + [hi - at])

    @staticmethod
    def _step_range_triton(pack: _Pack, group: dict, first: int, end: int, t: int) -> None:
        """_step_range in one launch of kernels/adamw8bit.py, which reads each param and grad where it is."""
        if pack.tables is None:
            numels = [p.numel() for p in pack.params]
            pack.tables = (torch.tensor(numels, device=pack.state1.device),
                           *block_tables(numels, pack.state1.device))
        grads = [None] * len(pack.params)
        for i in range(first, end):
            grads[i] = pack.params[i].grad.contiguous()  # (a no-op for autograd's grads)
        lo, hi = pack.offsets[first] // BLOCK, pack.offsets[end] // BLOCK
        beta1, beta2 = group["betas"]
        adamw8bit_step_triton(pack.params, grads, pack.tables, pack.state1, pack.state2, pack.absmax1, pack.absmax2,
                              pack.maps, lo, hi - lo, group["lr"], beta1, beta2, group["eps"],
                              group["weight_decay"], t)
        # the kernel wrote the params through their addresses, which autograd cannot see: say so, as an in-place
        # torch op would (its checks of saved tensors, and minilora.lora.CastCache, go by these counters)
        torch.autograd.graph.increment_version(pack.params[first:end])

    @staticmethod
    def _step_chunk(pack: _Pack, group: dict, lo: int, hi: int, t: int, grads: list[Tensor], params: list[Tensor],
                    sizes: list[int]) -> None:
        """AdamW on elements lo:hi of the pack, whose split by `sizes` puts grads[k] / params[k] (flat views) at
        part 2k + 1."""
        g = torch.zeros(hi - lo, dtype=torch.float32, device=pack.state1.device)  # [n], padding stays 0
        p = torch.empty_like(g)  # [n], padding is never written back
        torch._foreach_copy_(g.split(sizes)[1::2], grads)
        p_parts = p.split(sizes)[1::2]
        torch._foreach_copy_(p_parts, params)
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        blocks = slice(lo // BLOCK, hi // BLOCK)
        if pack.quantized:
            signed, signed_mids, unsigned, unsigned_mids = pack.maps
            m = _dequantize(pack.state1[lo:hi], pack.absmax1[blocks], signed)
            v = _dequantize(pack.state2[lo:hi], pack.absmax2[blocks], unsigned)
        else:
            m, v = pack.state1[lo:hi], pack.state2[lo:hi]
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        del g  # one fp32 chunk less at the peak
        bias1, bias2_sqrt = 1 - beta1 ** t, math.sqrt(1 - beta2 ** t)
        if wd > 0:
            p.mul_(1 - lr * wd)
        if pack.quantized:  # bnb's 8-bit CPU / Triton update, op for op
            p.addcdiv_(m, v.sqrt().div_(bias2_sqrt).add_(eps), value=-lr / bias1)
            _quantize_(m, signed_mids, pack.state1[lo:hi], pack.absmax1[blocks])
            _quantize_(v, unsigned_mids, pack.state2[lo:hi], pack.absmax2[blocks])
        else:  # bnb's 32-bit CPU update
            p.add_(m / v.sqrt().add_(eps * bias2_sqrt), alpha=-lr * bias2_sqrt / bias1)
        torch._foreach_copy_(params, p_parts)
