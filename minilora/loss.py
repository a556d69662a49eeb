"""Cross-entropy over the LM head without ever holding all the logits: chunked, fused linear + CE.

The plain way to get the loss, `F.cross_entropy(lm_head(h).float(), labels)`, builds logits [N, V] in bf16,
an fp32 copy of them, and autograd keeps their softmax for backward. For 8192 tokens and Llama 3's
V = 128256 that is 2 + 4 + 4 GB, more than the whole QLoRA-quantised 8B model. Here, as in Liger-Kernel's
fused-linear-cross-entropy (github.com/linkedin/Liger-Kernel, ops/fused_linear_cross_entropy.py), the forward
walks over row chunks and, for each chunk, computes everything backward will need right away:

    z = h_c W^T                          [c, V]  in the input dtype (tensor cores)
    s = cap * tanh(z / cap)              Gemma 2's final-logit soft-capping (identity when cap is None)
    loss_c = sum_i logsumexp(s_i) - s_i[y_i]                      } fp32, in one Triton kernel on CUDA that
    dL/ds = softmax(s) - onehot(y)                                } writes dL/dz over z in its dtype
    dL/dz = dL/ds * (1 - tanh(z/cap)^2)  chain rule through the cap }   (kernels/cross_entropy.py)
    grad_h_c = dL/dz @ W                 [c, H]
    grad_W  += dL/dz^T @ h_c             [V, H]  (only when W is trainable)

then drops the chunk's logits. Backward only multiplies the stored gradients by the incoming scalar. Peak extra
memory is one chunk's logits (on CUDA one [c, V] tensor in the input dtype; the CPU reference adds an fp32 copy)
plus the gradients, instead of several [N, V] tensors.

Only positions with a label are worth a logit: prompt tokens masked with ignore_index are dropped before the
matmul, which for instruction tuning with long prompts skips most of the work.

The result is the SUM of token losses in fp32; the trainer divides by the number of label tokens in the whole
gradient-accumulation window, so every token weighs the same however the tokens fall into micro-batches.
"""
from __future__ import annotations

import torch

from minilora.kernels.cross_entropy import ce_loss, ce_loss_and_grad_

# Rows per chunk are chosen so that one chunk's logits would take this many bytes in fp32: big enough that the
# [c, H] x [H, V] matmul keeps the GPU busy, small enough that the chunk's [c, V] temporaries (on CUDA the logits,
# overwritten by their gradient; on the CPU reference also an fp32 copy) stay well under a gigabyte.
CHUNK_BYTES = {"cuda": 512 * 2**20, "cpu": 64 * 2**20}


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          softcap: float | None = None, ignore_index: int = -100,
                          chunk_size: int | None = None) -> torch.Tensor:
    """Sum over labelled positions of CE(softcap(hidden @ weight^T), labels), an fp32 scalar.

    hidden [N, H] or [B, T, H], already aligned with labels [N] or [B, T] (labels[i] is the token that
    hidden[i] must predict). weight [V, H] is the LM head, frozen or trainable. chunk_size: rows per chunk,
    default sized so one chunk's fp32 logits take about CHUNK_BYTES."""
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"chunked_cross_entropy: weight has shape {tuple(weight.shape)}, expected [vocab, {H}] "
                         f"to match hidden {tuple(hidden.shape)}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"chunked_cross_entropy: labels have shape {tuple(labels.shape)}, expected "
                         f"{tuple(hidden.shape[:-1])} to match hidden {tuple(hidden.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"chunked_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}; "
                         "cast one so the logits matmul runs in one dtype")
    hidden, labels = hidden.reshape(-1, H), labels.reshape(-1)  # [N, H], [N]

    # Keep only the positions that have a label; index_select's backward scatters grads back to [N, H].
    keep = (labels != ignore_index).nonzero().squeeze(1)  # [n]
    h, y = hidden.index_select(0, keep), labels.index_select(0, keep)  # [n, H], [n]
    V = weight.shape[0]
    if y.numel() and bool(((y < 0) | (y >= V)).any()):
        bad = y[(y < 0) | (y >= V)][0].item()
        raise ValueError(f"chunked_cross_entropy: label {bad} is outside the vocabulary [0, {V}) "
                         f"(and is not ignore_index={ignore_index})")
    if chunk_size is None:
        chunk_size = default_chunk_size(h.shape[0], V, h.device)
    if chunk_size < 1:
        raise ValueError(f"chunked_cross_entropy: chunk_size must be >= 1, got {chunk_size}")

    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _FusedLinearCE.apply(h, weight, y, softcap, chunk_size)
    with torch.no_grad():  # evaluation: the loss alone, no gradient buffers
        return sum((_chunk_loss_and_grad(hc, weight, yc, softcap, need_grad=False)[0]
                    for hc, yc in zip(h.split(chunk_size), y.split(chunk_size))),
                   torch.zeros((), dtype=torch.float32, device=h.device))


def default_chunk_size(n_rows: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk so that one chunk's fp32 logits take about CHUNK_BYTES, with the rows split into
    equal chunks (2 chunks of 4000 rather than 4096 + 3904)."""
    max_rows = max(1, CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"]) // (vocab * 4))
    n_chunks = max(1, -(-n_rows // max_rows))
    return max(1, -(-n_rows // n_chunks))


def _chunk_loss_and_grad(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, softcap: float | None,
                         need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For one chunk h [c, H], y [c]: (sum of CE losses, fp32 scalar; d loss / d logits [c, V] in h's dtype, or
    None). kernels/cross_entropy.py does the softmax part: on CUDA one Triton kernel reads the logits twice and
    writes the gradient over them (no fp32 [c, V] copy); elsewhere the torch reference, in an fp32 buffer."""
    z = h @ weight.T  # [c, V] in h's dtype (tensor cores)
    if not need_grad:
        return ce_loss(z, y, softcap), None
    return ce_loss_and_grad_(z, y, softcap), z  # z now holds the gradient


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc fp32. bf16/fp16 a, b on CUDA: one cuBLAS call that accumulates into fp32 (out_dtype,
    torch >= 2.8), so no [V, H] temporary is written and re-read per chunk; elsewhere through a temporary."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError):  # older torch: no out_dtype
            pass
    acc += (a @ b).float()


class _FusedLinearCE(torch.autograd.Function):
    """loss = sum CE(softcap(h W^T), y), with both gradients computed during the forward (see module doc)."""

    @staticmethod
    def forward(ctx, h, weight, y, softcap, chunk_size):
        # h [n, H] labelled rows only; weight [V, H]; y [n]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        # fp32 so the scale applied in backward (1/n_labels, times the fp16 loss scale) rounds only once
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_h else None  # [n, H]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None  # [V, H]
        for start in range(0, h.shape[0], chunk_size):
            hc, yc = h[start:start + chunk_size], y[start:start + chunk_size]  # [c, H], [c]
            loss_c, g = _chunk_loss_and_grad(hc, weight, yc, softcap, need_grad=True)
            loss += loss_c
            # g [c, V] is already in h's dtype: the matmuls run in the input dtype, like the unfused path's backward
            if need_h:
                grad_h[start:start + chunk_size] = g @ weight  # [c, H]
            if need_w:
                _addmm_fp32_(grad_w, g.T, hc)  # [V, H] += [V, c] @ [c, H]
            del g
        ctx.grads = (grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError("chunked_cross_entropy: backward ran twice through the same loss; its gradients "
                               "are computed in forward and released after the first backward (retain_graph "
                               "is not supported)")
        (grad_h, grad_w), (h_dtype, w_dtype) = ctx.grads, ctx.dtypes
        ctx.grads = None  # free the stored gradients as soon as they are handed over
        # In place: the fp32 buffers are ours, and scaling them before the cast keeps small values (fp16 loss
        # scaling) from rounding to zero.
        grad_h = grad_h.mul_(grad_out).to(h_dtype) if grad_h is not None else None
        grad_w = grad_w.mul_(grad_out).to(w_dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None
