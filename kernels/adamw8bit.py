"""One 8-bit AdamW step of many tensors in one launch: the Triton kernel behind minilora/optim.py's AdamW8bit.

The reference is the optimizer's own plain-torch step (`AdamW8bit._step_chunk`, which documents the formula and
bnb's semantics); `AdamW8bit._step_range` dispatches between the two. Why a kernel: a LoRA model's 448 small
tensors (8B shape) take ~350 torch launches a step even when stepped through flat buffers, and at a few
microseconds of CPU each the GPU idles through the step (H100, issue 6: the step spanned 18 ms of a 283 ms
training step for ~5 ms of kernel time). Here the whole step is one launch of ~1 ms; the 8B training step at
2 x 2048 ran 14,874 and 14,740 tok/s against 14,525 with the torch step (same device call; a third run with
the kernel, the call's first, gave 13,507).

Layout: the optimizer keeps each tensor's 8-bit state in flat buffers, each tensor's segment padded to whole
blocks of 256 (`_Pack`). A program takes one such block b: the tensor it belongs to and the block's first
element in that tensor come from two per-block tables, and the tensor's param and grad addresses from two
pointer tables (int64 addresses, rebuilt every step because autograd hands out new grad tensors):

    program b:  i = blk_param[b], e = blk_elem[b]        elements e .. e + 255 of param i (masked past its end)
                g = grad_i[e:], p = param_i[e:]           in fp32 (params and grads: fp32, bf16 or fp16)
                m = SIGNED[state1[b]] * absmax1[b],  v = UNSIGNED[state2[b]] * absmax2[b]
                m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g²
                p = p (1 - lr wd) - lr / (1 - b1^t) · m / (√v / √(1 - b2^t) + eps)
                absmax1[b] = max |m| over the block; state1[b] = number of midpoints of SIGNED below m / absmax1[b]
                (the same for v), i.e. the nearest level, found by an 8-step binary search over the 255 midpoints

Square root and divisions are IEEE round-to-nearest (tl.sqrt_rn, tl.div_rn), as torch's, and the compiler
may not fuse multiply-adds (enable_fp_fusion=False), so a level is chosen from the same fp32 value as in the
reference up to the order of the few fused torch ops (addcdiv). The padding past a tensor's end reads g = 0 and
its m, v decode to 0, as in the reference, so it never moves a block's absmax.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256  # elements per absmax block: bnb's blocksize for 8-bit optimizer states
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _lower_bound(mids_ptr, x, N_MIDS: tl.constexpr, STEPS: tl.constexpr):
    """Per element of x, how many of the sorted mids [N_MIDS] are < x (torch.bucketize(x, mids))."""
    lo = tl.zeros(x.shape, dtype=tl.int32)
    hi = tl.full(x.shape, N_MIDS, dtype=tl.int32)
    for _ in tl.static_range(STEPS):  # the answer is in [lo, hi]; halve it
        mid = (lo + hi) // 2
        below = tl.load(mids_ptr + mid, mask=mid < N_MIDS, other=float("inf")) < x
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
    return lo


@triton.jit
def _requantize(x, codes_ptr, absmax_ptr, mids_ptr, b, offs, BLOCK: tl.constexpr):
    """Write the block's absmax and the codes of x [BLOCK] (the nearest level of the map of mids_ptr)."""
    amax = tl.max(tl.abs(x), axis=0)
    scaled = tl.div_rn(x, tl.where(amax == 0, 1.0, amax))  # an all-zero block codes the level 0.0
    tl.store(absmax_ptr + b, amax)
    tl.store(codes_ptr + b * BLOCK + offs, _lower_bound(mids_ptr, scaled, 255, 8).to(tl.uint8))


@triton.jit
def _adamw8bit_kernel(
    grad_ptrs, param_ptrs,  # int64 [n_params]: addresses of each param's grad and data (contiguous, PARAM dtype)
    numels,  # int64 [n_params]
    blk_param, blk_elem,  # int64 [n_blocks]: the param of each block of the flat state, its first element there
    state1, state2,  # uint8 [n_blocks * BLOCK]: codes of m (signed map) and v (unsigned map)
    absmax1, absmax2,  # fp32 [n_blocks]
    code1, mids1, code2, mids2,  # fp32 [256], [255]: the signed and unsigned maps and their midpoints
    first_block,  # the run's first block: program b steps block first_block + b
    beta1, one_minus_beta1, beta2, one_minus_beta2,  # 1 - b computed in double on the host, as torch's alpha
    eps, decay, step_size, bias2_sqrt,  # decay = 1 - lr wd, step_size = lr / (1 - b1^t)
    PARAM: tl.constexpr,  # the params' dtype (fp32, bf16 or fp16); the math is fp32
    BLOCK: tl.constexpr,
):
    b = first_block + tl.program_id(0).to(tl.int64)
    i = tl.load(blk_param + b)
    e = tl.load(blk_elem + b)
    offs = tl.arange(0, BLOCK)
    inside = e + offs < tl.load(numels + i)
    g_ptr = tl.load(grad_ptrs + i).to(tl.pointer_type(PARAM))
    p_ptr = tl.load(param_ptrs + i).to(tl.pointer_type(PARAM))
    g = tl.load(g_ptr + e + offs, mask=inside, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + e + offs, mask=inside, other=0.0).to(tl.float32)

    m = tl.load(code1 + tl.load(state1 + b * BLOCK + offs).to(tl.int32)) * tl.load(absmax1 + b)
    v = tl.load(code2 + tl.load(state2 + b * BLOCK + offs).to(tl.int32)) * tl.load(absmax2 + b)
    m = m * beta1 + one_minus_beta1 * g
    v = v * beta2 + one_minus_beta2 * (g * g)
    p = p * decay
    p = p + (-step_size) * tl.div_rn(m, tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps)
    tl.store(p_ptr + e + offs, p.to(PARAM), mask=inside)  # round to nearest, as torch's copy
    _requantize(m, state1, absmax1, mids1, b, offs, BLOCK)
    _requantize(v, state2, absmax2, mids2, b, offs, BLOCK)


def block_tables(numels: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(blk_param, blk_elem) int64 [n_blocks] for tensors of these sizes laid end to end, each padded to whole
    blocks: block b belongs to param blk_param[b] and starts at its element blk_elem[b]."""
    param, elem = [], []
    for i, n in enumerate(numels):
        k = -(-n // BLOCK)
        param.append(torch.full((k,), i, dtype=torch.int64))
        elem.append(torch.arange(k, dtype=torch.int64) * BLOCK)
    return torch.cat(param).to(device), torch.cat(elem).to(device)


def adamw8bit_step_triton(params: list[torch.Tensor], grads: list[torch.Tensor | None], tables, state1, state2,
                          absmax1, absmax2, maps, first_block: int, n_blocks: int, lr: float, beta1: float,
                          beta2: float, eps: float, weight_decay: float, step: int) -> None:
    """Step blocks first_block .. first_block + n_blocks - 1 of a pack (their params must have a grad; the others'
    entries in `grads` may be None). params and grads: one float dtype, contiguous, on one device. tables: (numels,
    blk_param, blk_elem) as `block_tables` builds them, on that device. maps: (signed, its midpoints, unsigned,
    its midpoints)."""
    numels, blk_param, blk_elem = tables
    # pinned, so the copy is queued behind the backward instead of waiting for it (a pageable one syncs)
    ptrs = torch.tensor([[0 if g is None else g.data_ptr() for g in grads], [p.data_ptr() for p in params]],
                        dtype=torch.int64, pin_memory=state1.is_cuda).to(state1.device, non_blocking=True)
    signed, signed_mids, unsigned, unsigned_mids = maps
    bias1, bias2_sqrt = 1 - beta1 ** step, (1 - beta2 ** step) ** 0.5
    _adamw8bit_kernel[(n_blocks,)](
        ptrs[0], ptrs[1], numels, blk_param, blk_elem, state1, state2, absmax1, absmax2,
        signed, signed_mids, unsigned, unsigned_mids, first_block,
        beta1, 1 - beta1, beta2, 1 - beta2, eps, 1 - lr * weight_decay, lr / bias1, bias2_sqrt,
        PARAM=TL_DTYPES[params[0].dtype], BLOCK=BLOCK, num_warps=2, enable_fp_fusion=False)
