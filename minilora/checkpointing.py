"""Activation checkpointing per decoder layer: keep each layer's input, recompute the layer in backward.

Training a layer normally keeps every intermediate it made (q, k, v, attention output, the MLP's
[B, T, intermediate] activations, ...) until backward: for an 8B model at 8k tokens, gigabytes per layer.
With checkpointing a layer keeps only its input x [B, T, H]:

    forward:   x_i --layer (no_grad)--> x_{i+1}          keep x_i, nothing else
    backward:  x_i --layer (enable_grad)--> x_{i+1}      run it again, now recording the graph
               backprop grad(x_{i+1}) through it  -> grad(x_i), and the layer's LoRA weights' grads

Three modes, chosen per layer (`set_checkpointing(model, ["offload"] * 8 + ["recompute"] * 24)`):
    off        autograd keeps everything: fastest, most memory
    recompute  x_i stays on the GPU; costs one extra layer forward in backward (~1/3 more compute), less
               down_proj's GEMM, whose output the backward never reads (`recompute_output`)
    offload    as recompute, but x_i goes to pinned CPU memory during forward, on a side CUDA stream so the
               copy overlaps the layer's compute, and comes back during backward ahead of need: when layer i's
               backward starts, layer i-1's input starts its trip back while layer i recomputes. Host buffers
               come from a pool reused step after step, since allocating pinned memory per tensor is slow
               enough to eat the overlap (torchtune's activation offloading lost it that way).
               On a CPU-only machine the same code degenerates to synchronous copies, so CI tests it.

keep_attention (long sequences): a checkpointed layer also keeps what its attention kernel returned, the output
[B, H, T, D] and the logsumexp [B, H, T] (on the host too, with offload), and the recompute takes them from
there instead of running attention's forward again. Attention is the one part of a layer whose cost grows with
T² while its output grows with T: at the 8B shape's 32k tokens its forward is ~17 ms of a layer's ~150, for
256 MB. `_AttentionTape` does it as torch's selective checkpointing does (torch.utils.checkpoint's
`create_selective_checkpoint_contexts`), by a TorchDispatchMode below autograd: in the layer's forward it
records the outputs of SDPA's fused kernel op; in the recompute autograd still records the op's node, with
its own backward formula, and the mode hands back the recorded outputs in place of the kernel's. Every op of
the layer then passes through Python once more, a few microseconds each: nothing next to a long sequence's
kernels, but not free at short ones, hence a choice (memory_policy turns it on from KEEP_ATTENTION_MIN_SEQ).

Why a custom autograd.Function and not torch.utils.checkpoint: offloading needs control over where the
layer input lives between forward and backward, and the non-reentrant checkpoint keeps its inputs alive in a
closure that saved_tensors_hooks never see; the reentrant one would need the same stash code anyway. Here the
Function saves exactly one thing (x_i, or its host copy), and the layer's trainable parameters are passed as
Function inputs, so (a) the output requires grad even when x_0 does not (frozen embeddings: no
`enable_input_require_grads` hack), and (b) their gradients are *returned* by backward, so
`torch.autograd.grad` works as well as `.backward()`. Like torch.utils.checkpoint, the CPU and CUDA RNG states
are saved at forward and restored for the recompute, so LoRA dropout drops the same units twice; autocast
state is restored too.
"""
from __future__ import annotations

import contextlib
import os
import warnings
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from minilora.cuda_graphs import GraphedLayer, LayerGraphs

MODES = ("off", "recompute", "offload")


def set_checkpointing(model, modes: str | list[str], mlp_chunk: int | None = None,
                      keep_attention: bool = False, cuda_graphs: bool = False) -> None:
    """Give `model.layer_runners` one entry per decoder layer: None ("off") or a LayerCheckpoint.
    `modes` is one mode for every layer or a list with one mode per layer. `mlp_chunk` (tokens) makes every
    layer's MLP run in chunks of that many tokens, each recomputed in backward (`checkpoint_chunks`); None: whole.
    `keep_attention`: checkpointed layers keep their attention outputs for the recompute (module docstring).
    `cuda_graphs`: the "off" layers run as CUDA graphs once a batch shape is steady (minilora/cuda_graphs.py),
    unless they have LoRA dropout; without an MLP in chunks only."""
    n = len(model.model.layers)
    modes = [modes] * n if isinstance(modes, str) else list(modes)
    if len(modes) != n:
        raise ValueError(f"set_checkpointing: got {len(modes)} modes for {n} decoder layers")
    bad = sorted(set(modes) - set(MODES))
    if bad:
        raise ValueError(f"set_checkpointing: unknown mode(s) {bad}; expected one of {MODES}")
    offloader = HostOffloader() if "offload" in modes else None  # one pool and stream for the whole model
    runners = [None if m == "off" else LayerCheckpoint(offloader if m == "offload" else None, keep_attention)
               for m in modes]
    if mlp_chunk is not None and (not isinstance(mlp_chunk, int) or mlp_chunk < 1):
        raise ValueError(f"set_checkpointing: mlp_chunk must be a positive number of tokens, got {mlp_chunk!r}")
    off = [i for i, m in enumerate(modes) if m == "off"]
    layers = [model.model.layers[i] for i in off]
    if cuda_graphs and off and mlp_chunk is None and LayerGraphs.supported(layers):
        graphs = LayerGraphs(layers, off)
        for k, i in enumerate(off):
            runners[i] = GraphedLayer(graphs, k)
    model.layer_runners = runners if any(r is not None for r in runners) else None
    for layer in model.model.layers:
        layer.mlp.chunk_tokens = mlp_chunk


class LayerCheckpoint:
    """run(layer, x, inputs) -> layer(x, inputs), keeping only x for backward (on the host with an offloader),
    and with keep_attention the attention kernel's outputs too. The recompute calls layer(x, inputs,
    need_output=False) (DecoderLayer.forward): the layer may leave its output's values unset."""

    def __init__(self, offloader: HostOffloader | None = None, keep_attention: bool = False):
        self.offloader, self.keep_attention = offloader, keep_attention

    def __repr__(self):
        keep = ", keep_attention" if self.keep_attention else ""
        return f"LayerCheckpoint({'offload' if self.offloader else 'recompute'}{keep})"

    def __call__(self, layer, x: torch.Tensor, inputs) -> torch.Tensor:
        params = [p for p in layer.parameters() if p.requires_grad]  # LoRA A/B; frozen NF4 weights drop out
        if not torch.is_grad_enabled() or not (x.requires_grad or params):
            return layer(x, inputs)  # evaluation: nothing to save
        return _CheckpointedLayer.apply(layer, inputs, self.offloader, self.keep_attention, x, *params)


class _CheckpointedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer, inputs, offloader, keep_attention, x, *params):
        # x [B, T, H]; runs under no_grad (autograd.Function.forward always does): no activations kept
        ctx.layer, ctx.inputs, ctx.device = layer, inputs, x.device
        _save_forward_state(ctx, x.device)
        if offloader is None:
            ctx.stash = None
            ctx.save_for_backward(x, *params)
        else:
            ctx.stash = offloader.stash([x])
            ctx.save_for_backward(*params)  # saved so an in-place update before backward is caught
        tape = _AttentionTape() if keep_attention else None
        with tape or contextlib.nullcontext():
            y = layer(x, inputs)
        ctx.tape = tape
        if tape is not None and ctx.stash is not None:
            tape.move_to(ctx.stash)  # the big outputs travel with x, and come back with it
        return y

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        if ctx.stash is None:
            x, params = saved[0], saved[1:]
        else:
            x, *kept = ctx.stash.fetch()  # also starts bringing back the previous layer's input
            params = saved
            ctx.stash = None  # its host buffers go back to the pool
            if ctx.tape is not None:
                ctx.tape.move_back(kept)
        x = x.detach().requires_grad_(ctx.needs_input_grad[4])
        tape, ctx.tape = ctx.tape, None
        with _forward_rng(ctx, ctx.device), _recording(ctx, ctx.device), (tape or contextlib.nullcontext()):
            # [B, T, H]: only its graph is used, so the layer may leave the values unset (DecoderLayer.forward)
            out = ctx.layer(x, ctx.inputs, need_output=recompute_output())
        wrt = ([x] if x.requires_grad else []) + list(params)
        grads = torch.autograd.grad(out, wrt, grad_out, allow_unused=True)
        grad_x = grads[0] if x.requires_grad else None
        return (None, None, None, None, grad_x, *grads[len(wrt) - len(params):])


# --- keeping the attention kernel's outputs -------------------------------------------------------------------
_aten = torch.ops.aten
# SDPA's fused forward ops (one of them runs per SDPA call, by backend), with the position of their
# compute_log_sumexp argument: the no-grad forward passes False, and backward needs the logsumexp
ATTENTION_FORWARDS = {
    _aten._scaled_dot_product_flash_attention.default: None,  # always returns it
    _aten._scaled_dot_product_cudnn_attention.default: 4,
    _aten._scaled_dot_product_efficient_attention.default: 4,
    _aten._scaled_dot_product_flash_attention_for_cpu.default: None,
}
TAPE_HOST_MIN_BYTES = 2**20  # with offload, outputs from this size go to the host; smaller ones (RNG state) stay


class _AttentionTape(TorchDispatchMode):
    """Active around a checkpointed layer's forward, then around its recompute. First use: runs the attention
    ops of ATTENTION_FORWARDS (asking for the logsumexp) and records their outputs, in order. Second use: each
    such op takes the next recorded outputs instead of running; autograd, which sits above this mode, records
    the op's node on them as if it had run. An op that differs from the recorded one (a backend chosen
    differently under grad) just runs: correct, only not saved. Every other op runs as it is."""

    def __init__(self):
        super().__init__()
        self.records: list[tuple] = []  # [(op, outputs)]
        self.replaying = False
        self.on_host: list[tuple[list, int]] = []  # (a record's outputs, index) that move_to gave a stash

    def __enter__(self):
        self.pos = 0
        return super().__enter__()

    def __exit__(self, *exc):
        self.replaying = True  # the next use is the recompute
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in ATTENTION_FORWARDS:
            return func(*args, **kwargs)
        if not self.replaying:
            lse = ATTENTION_FORWARDS[func]
            if lse is not None:
                args = (*args[:lse], True, *args[lse + 1:])
            out = func(*args, **kwargs)
            self.records.append((func, list(out)))  # a list: move_to swaps tensors out and back in place
            return out
        recorded = self.records[self.pos] if self.pos < len(self.records) else (None, None)
        self.pos += 1
        if recorded[0] is not func:
            warnings.warn(f"keep_attention: the recompute runs {func} where the forward ran {recorded[0]}; attention "
                          f"is computed again (correct, but the saving is lost)")
            return func(*args, **kwargs)
        return tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in recorded[1])

    def move_to(self, stash: _Stash) -> None:
        """Hand the recorded outputs of TAPE_HOST_MIN_BYTES or more to `stash` (off the GPU until backward)."""
        self.on_host = [(out, j) for _, out in self.records for j, t in enumerate(out)
                        if isinstance(t, torch.Tensor) and t.numel() * t.element_size() >= TAPE_HOST_MIN_BYTES]
        stash.add([out[j] for out, j in self.on_host])
        for out, j in self.on_host:
            out[j] = None

    def move_back(self, tensors: list[torch.Tensor]) -> None:
        """The tensors `move_to` handed over, fetched back in the same order."""
        for (out, j), t in zip(self.on_host, tensors):
            out[j] = t
        self.on_host = []


# --- what a recompute replays: the forward's RNG and autocast state ---------------------------------------------
def recompute_output() -> bool:
    """Whether a recompute computes its function's output values, which its backward never reads: only the
    graph from the layer's input and parameters to it is used. The default, False, lets a Llama block skip
    down_proj's GEMM there (H·I of the 8B shape's 218M layer weights: 27% of the recompute's GEMM FLOPs) and MLP chunks skip their whole
    forward inside a recomputed layer. MINILORA_RECOMPUTE_OUTPUT=1 computes them, for before/after runs."""
    return os.environ.get("MINILORA_RECOMPUTE_OUTPUT", "0") == "1"


def _save_forward_state(ctx, device: torch.device) -> None:
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    ctx.rng = torch.get_rng_state(), cuda_rng
    ctx.autocast = torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)


@contextlib.contextmanager
def _forward_rng(ctx, device: torch.device):
    """The RNG as it was at forward, in a fork: the caller's RNG stream continues as if no recompute happened."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type="cuda"):
        torch.set_rng_state(ctx.rng[0])
        if ctx.rng[1] is not None:
            torch.cuda.set_rng_state(ctx.rng[1], device)
        yield


@contextlib.contextmanager
def _recording(ctx, device: torch.device):
    """Grad on and the forward's autocast state: the recompute builds the graph the forward did not."""
    with torch.enable_grad(), torch.autocast(device.type, enabled=ctx.autocast[0], dtype=ctx.autocast[1]):
        yield


# --- token chunks inside a layer ------------------------------------------------------------------------------
def checkpoint_chunks(fn, x: torch.Tensor, params: list[torch.Tensor], chunk: int,
                      need_output: bool = True) -> torch.Tensor:
    """fn(x) for a token-wise fn ([..., H_in] -> [..., H_out], no mixing between tokens: the MLP), computed
    `chunk` tokens at a time. Only x is kept for backward, which recomputes fn chunk by chunk and backpropagates
    each chunk before the next: fn's intermediates exist for one chunk at a time, in forward and in backward.
    fn takes (x, need_output); the recompute calls it with need_output=False, since it only backpropagates.
    need_output=False here (the caller never reads the values: the recompute of a checkpointed layer) runs no
    chunk at all and returns an unset tensor shaped like x (fn must keep the width, as the MLP does); backward
    is the same as always.

    Why: at long context the MLP's [tokens, intermediate] tensors are what no longer fits. An 8B model at
    360k tokens has gate and up outputs of 9.6 GiB each, and backward needs several such tensors at once, even
    inside a checkpointed layer. In chunks of 8k tokens that is 0.22 GiB each. The price is gate_proj and up_proj
    once more per layer (down_proj's output is not needed there), small next to attention at those lengths. `params` are fn's trainable parameters
    (LoRA A/B): their gradients are summed over the chunks and returned, as in _CheckpointedLayer."""
    return _ChunkedTokens.apply(fn, chunk, need_output, x, *params)


class _ChunkedTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, chunk, need_output, x, *params):
        ctx.fn, ctx.chunk = fn, chunk
        _save_forward_state(ctx, x.device)  # replayed once for the recompute, whose chunks draw in the same order
        ctx.save_for_backward(x, *params)
        if not need_output:
            return torch.empty_like(x)
        flat = x.reshape(-1, x.shape[-1])  # [N, H_in]
        out = None
        for i in range(0, flat.shape[0], chunk):
            y = fn(flat[i:i + chunk], True)  # [chunk, H_out]
            if out is None:
                out = y.new_empty(flat.shape[0], y.shape[-1])
            out[i:i + chunk] = y
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, *params = ctx.saved_tensors
        flat, dy = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        dx = torch.empty_like(flat) if ctx.needs_input_grad[3] else None
        dparams = [None] * len(params)
        with _forward_rng(ctx, x.device):
            for i in range(0, flat.shape[0], ctx.chunk):
                xc = flat[i:i + ctx.chunk].detach().requires_grad_(dx is not None)
                with _recording(ctx, x.device):
                    y = ctx.fn(xc, recompute_output())  # only backpropagated: its values may stay unset
                wrt = ([xc] if dx is not None else []) + params
                grads = torch.autograd.grad(y, wrt, dy[i:i + ctx.chunk], allow_unused=True)
                if dx is not None:
                    dx[i:i + ctx.chunk] = grads[0]
                for j, g in enumerate(grads[len(wrt) - len(params):]):
                    if g is not None:
                        dparams[j] = g if dparams[j] is None else dparams[j].add_(g)
        return (None, None, None, None if dx is None else dx.view(x.shape), *dparams)


# --- offloading ----------------------------------------------------------------------------------------------
class HostOffloader:
    """Moves checkpointed layer inputs to host memory and back; one per model, shared by its offloaded layers.

    Ordering on CUDA (main = the compute stream, side = self.stream; both copy directions use side, so a
    host buffer's next download can never overtake its previous upload):
        stash:  side waits for main (x is computed) -> side copies x to host -> x.record_stream(side),
                so the allocator does not hand x's memory out again before the copy has read it
        fetch:  side waits for main (the destination block is free on main) -> side copies host -> GPU,
                records an event -> main waits for that event only
    `pending` lists the stashes in forward order, weakly, so a graph dropped without backward frees its buffers.

    Host memory comes in pieces of one size class, `host_piece(nbytes)` = min(slab_bytes, next power of two >=
    the input), and an input larger than a slab spans several. Why not one buffer per input: pinned memory is
    allocated by torch's caching host allocator in powers of two, so one 2.75 GiB input (8B model, 360k tokens)
    would pin 4 GiB, and 32 of them more than the host has; in 64 MiB slabs the waste is under 64 MiB an input.
    Inputs above a slab reuse the same slabs whatever their length; smaller ones take a new size class when their
    power of two changes (the free buffers of the old class leave the pool, and torch's pinned cache keeps them).
    """

    def __init__(self, slab_bytes: int = 2**26):
        self.slab_bytes = slab_bytes
        self.pool: list[_HostBuffer] = []
        self.pending: list[weakref.ref] = []
        self.stream: torch.cuda.Stream | None = None  # made on first CUDA use

    def stash(self, tensors: list[torch.Tensor]) -> _Stash:
        """Copy a layer's tensors (its input; `_Stash.add` may add more) to host buffers; they come back together."""
        st = _Stash(self, tensors[0].device)
        st.add(tensors)
        self.pending = [r for r in self.pending if r() is not None] + [weakref.ref(st)]
        return st

    def _copy_out(self, x: torch.Tensor, owner: _Stash) -> _Stashed:
        # dims ordered by stride: a permuted-contiguous tensor (attention's [B, H, T, D] view of [B, T, H, D]
        # memory) travels as it lies in memory and comes back with the same strides, as backward kernels expect
        order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
        dense = x.permute(order).contiguous()
        nbytes = dense.numel() * dense.element_size()
        src = dense.view(-1).view(torch.uint8)  # [nbytes]: the tensor's bytes, whatever its dtype
        bufs = self._acquire(nbytes, x.device)
        size = bufs[0].data.numel()
        pieces = [b.data[:min(size, nbytes - i * size)] for i, b in enumerate(bufs)]  # host views, in order
        if x.is_cuda:
            side = self._side_stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for i, piece in enumerate(pieces):
                    piece.copy_(src[i * size:i * size + piece.numel()], non_blocking=True)
            dense.record_stream(side)
        else:
            for i, piece in enumerate(pieces):
                piece.copy_(src[i * size:i * size + piece.numel()])
        for b in bufs:
            b.owner = weakref.ref(owner)
        return _Stashed(pieces, dense.shape, x.dtype, order)

    def prefetch_before(self, st: _Stash) -> None:
        """Layer st's backward is under way: start fetching the input stashed just before it (the previous
        layer's), so its copy overlaps this layer's recompute and backward."""
        self.pending = [r for r in self.pending if r() is not None and r() is not st]
        if self.pending:
            self.pending[-1]().start_fetch()

    def _acquire(self, nbytes: int, device: torch.device) -> list[_HostBuffer]:
        """ceil(nbytes / size) free pooled buffers of this input's size class, allocating what is missing.
        Free buffers of other size classes below a slab are released first when new memory is needed, so the
        pool follows the workload instead of growing with every sequence length it has seen. Free slabs stay:
        every tensor above a slab uses them whatever its length (a layer's input and attention output beside
        a logsumexp of a smaller class that changes with the length)."""
        size = host_piece(nbytes, self.slab_bytes)
        count = -(-nbytes // size)
        free = [b for b in self.pool if b.owner is None or b.owner() is None]
        fits = [b for b in free if b.data.numel() == size][:count]
        if len(fits) < count:
            self.pool = [b for b in self.pool if b in fits or not (b.owner is None or b.owner() is None)
                         or b.data.numel() in (size, self.slab_bytes)]
            pin = device.type == "cuda"
            new = [_HostBuffer(torch.empty(size, dtype=torch.uint8, pin_memory=pin)) for _ in range(count - len(fits))]
            self.pool += new
            fits += new
        return fits

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self.stream is None or self.stream.device != device:
            self.stream = torch.cuda.Stream(device=device)
        return self.stream


def host_piece(nbytes: int, slab_bytes: int = 2**26) -> int:
    """The size class of a HostOffloader buffer for an input of nbytes: a slab, or the power of two that fits."""
    return min(slab_bytes, max(2**21, 1 << (nbytes - 1).bit_length()))


def host_bytes(nbytes: int, slab_bytes: int = 2**26) -> int:
    """Pinned host bytes a HostOffloader holds for one input of nbytes (whole pieces of its size class)."""
    piece = host_piece(nbytes, slab_bytes)
    return -(-nbytes // piece) * piece


class _HostBuffer:
    """Pooled host bytes (pinned on CUDA machines); free when its owning stash is gone."""

    def __init__(self, data: torch.Tensor):
        self.data = data  # [size] uint8
        self.owner: weakref.ref | None = None


class _Stashed:
    """One tensor in host buffers: its bytes in `pieces`, laid out as shape (the tensor's dims in `order`)."""

    def __init__(self, pieces: list[torch.Tensor], shape, dtype, order: list[int]):
        self.pieces, self.shape, self.dtype, self.order = pieces, shape, dtype, order

    def empty(self, device: torch.device) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=device)

    def copy_back(self, dense: torch.Tensor, non_blocking: bool) -> torch.Tensor:
        """Fill dense (from `empty`) with the bytes; return it with the original dims and strides."""
        out, at = dense.view(-1).view(torch.uint8), 0
        for piece in self.pieces:
            out[at:at + piece.numel()].copy_(piece, non_blocking=non_blocking)
            at += piece.numel()
        inverse = sorted(range(len(self.order)), key=lambda d: self.order[d])
        return dense.permute(inverse)


class _Stash:
    """One layer's tensors (its input first) living in host buffers until its layer's backward brings them back."""

    def __init__(self, offloader: HostOffloader, device: torch.device):
        self.offloader, self.device = offloader, device
        self.stashed: list[_Stashed] = []
        self.on_device: list[torch.Tensor] | None = None
        self.ready: torch.cuda.Event | None = None

    def add(self, tensors: list[torch.Tensor]) -> None:
        self.stashed += [self.offloader._copy_out(t, self) for t in tensors]

    def start_fetch(self) -> None:
        if self.on_device is not None:
            return  # already prefetched
        dense = [s.empty(self.device) for s in self.stashed]  # allocated on main, where they are used and freed
        if self.device.type != "cuda":
            self.on_device = [s.copy_back(d, non_blocking=False) for s, d in zip(self.stashed, dense)]
            return
        main, side = torch.cuda.current_stream(self.device), self.offloader._side_stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self.on_device = [s.copy_back(d, non_blocking=True) for s, d in zip(self.stashed, dense)]
            self.ready = torch.cuda.Event()
            self.ready.record(side)

    def fetch(self) -> list[torch.Tensor]:
        """The tensors back on their device, ready for use on the current stream; prefetches the previous layer's."""
        self.start_fetch()
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
        self.offloader.prefetch_before(self)
        tensors, self.on_device = self.on_device, None
        return tensors
