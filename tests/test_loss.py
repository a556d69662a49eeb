"""chunked_cross_entropy against the unfused oracle: full logits, softcap, F.cross_entropy(reduction="sum")."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import report
from minilora.loss import chunked_cross_entropy, default_chunk_size


def reference(hidden, weight, labels, softcap=None, ignore_index=-100):
    logits = (hidden @ weight.T).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                           reduction="sum")


def make(N=37, H=24, V=101, dtype=torch.float32, seed=0, ignore_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 2 / H**0.5).to(dtype)  # logits std ~2, as in real LMs
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < ignore_frac] = -100
    return hidden, weight, labels


def loss_and_grads(fn, hidden, weight, labels, train_weight, **kw):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(train_weight)
    loss = fn(h, w, labels, **kw)
    # a scale other than 1, like the trainer's 1 / n_labels, so backward's scaling is exercised
    (loss * 0.37).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("train_weight", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 37, 1000, None])
def test_matches_full_logits_fp32(softcap, train_weight, chunk_size):
    hidden, weight, labels = make()
    ref = loss_and_grads(reference, hidden, weight, labels, train_weight, softcap=softcap)
    out = loss_and_grads(chunked_cross_entropy, hidden, weight, labels, train_weight, softcap=softcap,
                         chunk_size=chunk_size)
    assert out[0].dtype == torch.float32
    assert report("loss", out[0], ref[0])[0] <= 1e-4 * ref[0].abs().item()
    assert report("grad hidden", out[1], ref[1])[0] <= 1e-5
    if train_weight:
        assert report("grad weight", out[2], ref[2])[0] <= 1e-5
    else:
        assert out[2] is None


def test_batched_shape_and_ignored_rows_get_zero_grad():
    hidden, weight, labels = make(N=2 * 19)
    hidden, labels = hidden.view(2, 19, -1), labels.view(2, 19)
    ref = loss_and_grads(reference, hidden, weight, labels, True)
    out = loss_and_grads(chunked_cross_entropy, hidden, weight, labels, True, chunk_size=7)
    assert out[1].shape == hidden.shape
    assert report("loss [B,T,H]", out[0], ref[0])[0] <= 1e-4 * ref[0].abs().item()
    assert report("grad hidden [B,T,H]", out[1], ref[1])[0] <= 1e-5
    assert report("grad weight [B,T,H]", out[2], ref[2])[0] <= 1e-5
    assert out[1][labels == -100].abs().max() == 0


def test_custom_ignore_index_and_all_ignored():
    hidden, weight, labels = make()
    labels[labels == -100] = 7  # now a real token id...
    labels[::3] = 0  # ...and 0 plays ignore_index
    ref = loss_and_grads(reference, hidden, weight, labels, True, ignore_index=0)
    out = loss_and_grads(chunked_cross_entropy, hidden, weight, labels, True, ignore_index=0, chunk_size=4)
    assert report("loss ignore_index=0", out[0], ref[0])[0] <= 1e-4 * ref[0].abs().item()
    assert report("grad hidden ignore_index=0", out[1], ref[1])[0] <= 1e-5
    # a micro-batch whose labels are all masked must still backprop (zeros), not raise
    out = loss_and_grads(chunked_cross_entropy, hidden, weight, torch.full_like(labels, -100), True)
    assert out[0].item() == 0 and out[1].abs().max() == 0 and out[2].abs().max() == 0


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_bf16_close_to_fp32_oracle(softcap):
    hidden, weight, labels = make(N=64, H=64, V=300)
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    exact = loss_and_grads(reference, hb.float(), wb.float(), labels, True, softcap=softcap)
    out = loss_and_grads(chunked_cross_entropy, hb, wb, labels, True, softcap=softcap, chunk_size=16)
    unfused = loss_and_grads(reference, hb, wb, labels, True, softcap=softcap)  # bf16 logits, fp32 CE
    assert out[1].dtype == torch.bfloat16 and out[2].dtype == torch.bfloat16
    # the loss inherits the bf16 rounding of the logits (~2^-9 relative each), hence 3e-4 and not fp32's 1e-4
    assert report("bf16 loss", out[0], exact[0])[0] <= 3e-4 * exact[0].abs().item()
    for i, name in ((1, "grad hidden"), (2, "grad weight")):
        mx, _ = report(f"bf16 {name}", out[i], exact[i])
        report(f"  (unfused bf16 {name})", unfused[i], exact[i])
        assert mx <= 1e-2 * exact[i].abs().max().item()


def test_no_grad_path_gives_same_loss():
    hidden, weight, labels = make()
    ref = reference(hidden, weight, labels, softcap=2.0)
    with torch.no_grad():
        out = chunked_cross_entropy(hidden.requires_grad_(), weight, labels, softcap=2.0, chunk_size=6)
    assert out.grad_fn is None
    assert report("no-grad loss", out, ref)[0] <= 1e-4 * ref.abs().item()


def test_default_chunk_size_splits_evenly():
    cpu = torch.device("cpu")
    assert default_chunk_size(10, 100, cpu) == 10  # everything fits in one chunk
    c = default_chunk_size(8192, 128256, torch.device("cuda"))
    assert c * 128256 * 4 <= 512 * 2**20 * 1.01 and -(-8192 // c) * c - 8192 < -(-8192 // c)


def test_bad_inputs_name_the_problem():
    hidden, weight, labels = make()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        chunked_cross_entropy(hidden, weight, torch.full_like(labels, 101))
    with pytest.raises(ValueError, match="labels have shape"):
        chunked_cross_entropy(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="weight has shape"):
        chunked_cross_entropy(hidden, weight.T, labels)
    with pytest.raises(ValueError, match="bfloat16"):
        chunked_cross_entropy(hidden.bfloat16(), weight, labels)


def test_second_backward_raises():
    hidden, weight, labels = make()
    loss = chunked_cross_entropy(hidden.requires_grad_(), weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the fp32-accumulating addmm path")
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_cuda_bf16_trainable_head(softcap):
    hidden, weight, labels = make(N=300, H=128, V=1000)
    hb, wb, labels = hidden.bfloat16().cuda(), weight.bfloat16().cuda(), labels.cuda()
    exact = loss_and_grads(reference, hb.double(), wb.double(), labels, True, softcap=softcap)
    out = loss_and_grads(chunked_cross_entropy, hb, wb, labels, True, softcap=softcap, chunk_size=64)
    assert report("cuda bf16 loss", out[0], exact[0])[0] <= 3e-4 * exact[0].abs().item()
    for i, name in ((1, "grad hidden"), (2, "grad weight")):
        assert report(f"cuda bf16 {name}", out[i], exact[i])[0] <= 1e-2 * exact[i].abs().max().item()
