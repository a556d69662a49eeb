"""CUDA graphs for the decoder layers that keep their activations (checkpointing "off"): each layer's forward
and backward replayed as two recorded graphs instead of ~80 and ~110 kernels launched one by one from Python.

Why: at the 8B shape's 2 x 2048 tokens the GPU runs ~220 ms of kernels in a ~245 ms step; the rest it waits
for the CPU, which spends a few to tens of microseconds of Python per launch (autograd Functions, Triton's
launcher, casts) and falls behind at the small kernels between the GEMMs (issue 6's profiles: 3,340 gaps). A
graph replay is one launch for the whole layer. H200, one call, interleaved (issue 6, gpu_session part28): Llama
3.2 1B at 2 x 2048, 82,789 tok/s with graphs against 53,850 without; at 8 x 2048, 87,795 against 85,684; the 8B
shape at 2 x 2048, 17,103 and 16,990 against 16,826 and 16,852. torch.cuda.make_graphed_callables does the same for modules,
but replaces their forward and hands back detached static gradients that AccumulateGrad may adopt as `.grad`,
so a second micro-batch's replay would overwrite the first one's gradients; here the Function returns the
static gradients themselves, which autograd then copies (another reference is held), and eager layers stay
eager.

How (as make_graphed_callables, in one private memory pool, recorded in the order they replay):
    capture, for a batch shape seen STEADY_STEPS forwards in a row:
        warm-up: WARMUP_ITERS eager forward + backward passes of each layer on the capture stream
                 (one-time work, cuBLAS workspaces, Triton's first launch, cuDNN's plans, stays out of graphs)
        forward graphs, first layer to last:   out_i = layer_i(x_i, inputs)    x_i, inputs: static buffers
        backward graphs, last layer to first:  dx_i, dparams_i = grad(out_i, (x_i, params_i), dout_i)
    each later forward at that shape: copy x into x_i (no copy when it is the previous layer's out), replay;
    its backward: copy dout into dout_i, replay, return dx_i and dparams_i.
Any other shape, no-grad evaluation and generation run eagerly (the graphs stay for when the shape returns);
a new steady shape is captured in their place, MAX_CAPTURES times at most.
The pool keeps every graphed layer's activations allocated between steps; memory_policy turns graphs on only
where the budget has room for that (`Plan.cuda_graphs`). Not with LoRA dropout (each replay would draw the
same mask), which `LayerGraphs.supported` checks.
"""
from __future__ import annotations

import copy
import os
import warnings

import torch

STEADY_STEPS = 2  # forwards in a row at one shape before its graphs are captured: the first ones run eagerly
# captures in a model's life at most: each costs WARMUP_ITERS eager passes and the recording, and batch lengths
# that settle in turns (512, 512, 1024, 1024, 512, ...) would otherwise pay that at every turn
MAX_CAPTURES = 4
WARMUP_ITERS = 2  # eager forward + backward passes of each layer before capture (make_graphed_callables: 3)


def cuda_graphs_env() -> bool | None:
    """MINILORA_CUDA_GRAPHS=0/1 overrides the memory plan's choice; None when unset."""
    v = os.environ.get("MINILORA_CUDA_GRAPHS")
    return None if v is None else v == "1"


class _Entry:
    """One layer's graphs at one shape: static input x, output out and upstream gradient dout, and the
    gradients the backward graph writes (dx, dparams). params: the layer's trainable parameters, which the
    replay hands to autograd; aliases: detached views of them (same storage, so a graph reads the current
    values) that the capture differentiates instead (`_run`)."""

    def __init__(self, layer, params: dict[str, torch.Tensor]):
        self.layer, self.x, self.params = layer, None, list(params.values())  # x: made at capture
        self.aliases = {name: p.detach().requires_grad_() for name, p in params.items()}
        self.fwd = self.bwd = self.out = self.dout = self.dx = None
        self.dparams: list[torch.Tensor | None] = []


class LayerGraphs:
    """The graphs of a model's graphed layers (set_checkpointing(..., cuda_graphs=True) gives every "off" layer a
    GraphedLayer runner sharing one). Layer k of the graphed ones (in forward order) calls `forward(k, ...)`."""

    def __init__(self, layers: list, indices: list[int]):
        self.layers = layers
        # a graphed layer right after another takes its output buffer as its static input (no copy); where an
        # eager layer sits between them, it must not: the copy in would overwrite what that layer saved
        self.chained = [k > 0 and indices[k] == indices[k - 1] + 1 for k in range(len(indices))]
        self.key, self.seen = None, 0  # the shape of the last forwards, and how many in a row
        self.captured_key, self.entries, self.inputs = None, [], None
        self.replaying = False  # this forward replays (decided at the first graphed layer)
        self.failed = False
        self.captures = self.replays = 0  # how many times graphs were captured, and forwards replayed

    @staticmethod
    def supported(layers) -> bool:
        return not any(getattr(m, "lora_dropout", 0) > 0 for layer in layers for m in layer.modules())

    def forward(self, k: int, layer, x: torch.Tensor, inputs) -> torch.Tensor:
        if k == 0:
            self._begin(x, inputs)
        if not self.replaying:
            return layer(x, inputs)
        e = self.entries[k]
        if x.requires_grad != e.x.requires_grad:  # another graph upstream than at capture: run this one eagerly
            return layer(x, inputs)
        return _Replay.apply(e, x, *e.params)

    def _begin(self, x: torch.Tensor, inputs) -> None:
        """At the first graphed layer of a forward: replay if its shape has graphs, capture them if it has been
        steady long enough, else run eagerly."""
        self.replaying = False
        if self.failed or not x.is_cuda or not torch.is_grad_enabled():
            return
        key = _key(x, inputs)
        self.seen = self.seen + 1 if key == self.key else 1
        self.key = key
        if key != self.captured_key:
            if self.seen < STEADY_STEPS or self.captures >= MAX_CAPTURES:
                return
            try:
                self._capture(x, inputs)
            except RuntimeError as err:  # a kernel that cannot be captured: eager from now on, still correct
                self.failed, self.entries, self.captured_key = True, [], None
                warnings.warn(f"CUDA graphs: capture failed, the layers run eagerly: {err}")
                return
            self.captured_key = key
            self.captures += 1
        for name, pairs in inputs.cos_sin.items():  # this forward's positions and masks into the static copies
            for dst, src in zip(self.inputs.cos_sin[name], pairs):
                dst.copy_(src)
        for name, mask in inputs.masks.items():
            if mask is not None:
                self.inputs.masks[name].copy_(mask)
        self.replaying = True
        self.replays += 1

    def _capture(self, x: torch.Tensor, inputs) -> None:
        static_inputs = copy.copy(inputs)  # the same fields, with tensors of its own
        static_inputs.cos_sin = {n: tuple(t.clone() for t in cs) for n, cs in inputs.cos_sin.items()}
        static_inputs.masks = {n: None if m is None else m.clone() for n, m in inputs.masks.items()}
        self.entries, self.inputs = [], static_inputs
        pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        requires_grad = x.requires_grad
        with torch.cuda.stream(stream):
            for layer in self.layers:  # warm-up, eagerly
                e = _Entry(layer, {n: p for n, p in layer.named_parameters() if p.requires_grad})
                for _ in range(WARMUP_ITERS):
                    xs = x.detach().clone().requires_grad_(requires_grad)
                    out = _run(e, xs, static_inputs)
                    wrt = ([xs] if requires_grad else []) + list(e.aliases.values())
                    if wrt:
                        torch.autograd.grad(out, wrt, torch.ones_like(out))
                    del xs, out
                self.entries.append(e)
                requires_grad = requires_grad or bool(e.params)  # the next layer's input
            stream.synchronize()
            prev = None
            requires_grad = x.requires_grad
            for e, chained in zip(self.entries, self.chained):  # forward graphs
                e.x = (prev.detach() if chained else torch.empty_like(x)).requires_grad_(requires_grad)
                e.fwd = torch.cuda.CUDAGraph()
                with torch.cuda.graph(e.fwd, pool=pool, stream=stream):
                    e.out = _run(e, e.x, static_inputs)
                prev, requires_grad = e.out, requires_grad or bool(e.params)
            for e in reversed(self.entries):  # backward graphs, last layer first, as they replay
                e.dout = torch.empty_like(e.out)
                wrt = ([e.x] if e.x.requires_grad else []) + list(e.aliases.values())
                if not wrt:  # nothing upstream trains: no backward through this layer
                    e.out = e.out.detach()
                    continue
                e.bwd = torch.cuda.CUDAGraph()
                with torch.cuda.graph(e.bwd, pool=pool, stream=stream):
                    grads = torch.autograd.grad(e.out, wrt, e.dout)
                e.dx = grads[0] if e.x.requires_grad else None
                e.dparams = list(grads[len(wrt) - len(e.params):])
                e.out = e.out.detach()  # its autograd graph is spent: keep only the buffer
        torch.cuda.current_stream().wait_stream(stream)


def _run(e: _Entry, x: torch.Tensor, inputs) -> torch.Tensor:
    """The layer's forward with its trainable parameters replaced by their aliases. Differentiating the real
    parameters inside a capture fails: each has one AccumulateGrad node for as long as any graph through it
    lives (the caller's last loss keeps one), recorded on the stream of the step that made it, and the
    capture's backward then syncs with that stream, which invalidates the capture
    (cudaErrorStreamCaptureInvalidated on an H200, issue 6). The aliases' nodes are made on the capture stream."""
    return torch.func.functional_call(e.layer, e.aliases, (x, inputs))


def _key(x: torch.Tensor, inputs) -> tuple:
    """What a graph is specific to: the input's shape, dtype and device, whether it requires grad, the static
    inputs' shapes (None masks included) and the SDPA backend order."""
    shapes = tuple((n, tuple(t.shape), t.dtype) for n, cs in sorted(inputs.cos_sin.items()) for t in cs)
    masks = tuple((n, None if m is None else tuple(m.shape)) for n, m in sorted(inputs.masks.items()))
    order = tuple(inputs.sdpa_order) if inputs.sdpa_order is not None else None
    return tuple(x.shape), x.dtype, x.device, x.requires_grad, shapes, masks, order


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, e: _Entry, x, *params):
        if x.data_ptr() != e.x.data_ptr():
            e.x.copy_(x)
        e.fwd.replay()
        ctx.e = e
        return e.out.detach()  # the static buffer: the next replay of this layer overwrites it

    @staticmethod
    def backward(ctx, dout):
        e = ctx.e
        e.dout.copy_(dout)
        e.bwd.replay()
        # the static tensors themselves, not detached copies: autograd sees them referenced elsewhere and
        # accumulates a copy into .grad instead of adopting the buffer the next replay overwrites
        return (None, e.dx, *e.dparams)


class GraphedLayer:
    """A layer runner (model.layer_runners) for an un-checkpointed layer: run(layer, x, inputs) through the
    shared LayerGraphs, as graphed layer number k."""

    def __init__(self, graphs: LayerGraphs, k: int):
        self.graphs, self.k = graphs, k

    def __repr__(self):
        return f"GraphedLayer({self.k})"

    def __call__(self, layer, x: torch.Tensor, inputs) -> torch.Tensor:
        return self.graphs.forward(self.k, layer, x, inputs)
