"""Text generation with a KV cache: the prompt goes through the model once (prefill), then each new token is fed
alone while its keys/values are appended to the cache, so step t attends over t cached positions instead of
re-running the whole sequence.

    new_ids = generate(model, tokenizer.encode(prompt), max_new_tokens=64)                       # greedy
    new_ids = generate(model, ids, temperature=0.7, top_p=0.9, seed=0, stream=print)            # sampled

Each step turns the last position's logits into the next token as transformers' `generate` does, so greedy output
is token-identical to it and sampling draws from the same distribution (the same filters, in the same order):

    logits (fp32) -> repetition penalty -> greedy: argmax
                                        -> sampling: temperature -> top-k -> top-p -> min-p -> softmax -> draw

The order is transformers' `GenerationMixin._get_logits_processor`: the repetition penalty is a logits processor,
so it applies to greedy decoding too; the four warpers apply only when sampling, temperature first so top-p and
min-p see the tempered distribution. Filtered tokens get logit -inf. Generation stops after `max_new_tokens`, or
right after a token from `eos_token_ids`, which is returned with the rest (transformers keeps the eos too).

Batch size 1: one prompt, so there is no padding and the model's causal mask is all the masking needed.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from minilora.models.common import KVCache

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------------------
# logits processors: [B, V] fp32 logits in, [B, V] out. Each mirrors the transformers class named in its docstring.

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """RepetitionPenaltyLogitsProcessor (CTRL, Keskar et al. 2019). seen [B, S]: ids already in the sequence,
    prompt included. A seen token's logit is divided by `penalty` if positive and multiplied if negative, so
    penalty > 1 always makes it less likely; once per token, however often it occurred."""
    score = logits.gather(-1, seen)  # [B, S]
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(-1, seen, score)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """TemperatureLogitsWarper: softmax(logits / T); T < 1 sharpens, T > 1 flattens."""
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """TopKLogitsWarper: keep the k largest logits. Tokens tied with the k-th are all kept."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """TopPLogitsWarper (nucleus sampling, Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probabilities sum to at least p. Computed from the other end: drop the least likely tokens while their total
    mass stays <= 1 - p. The most likely token always survives."""
    sorted_logits, order = torch.sort(logits, descending=False)  # [B, V], least likely first
    tail_mass = sorted_logits.softmax(-1).cumsum(-1)  # [B, V]
    drop_sorted = tail_mass <= 1 - p
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """MinPLogitsWarper (Nguyen et al. 2024): drop tokens less likely than min_p times the top token's probability,
    so the cut tightens when the model is confident. The top token survives since min_p <= 1."""
    probs = logits.softmax(-1)  # [B, V]
    return logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), NEG_INF)


def warp(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
         min_p: float = 0.0) -> torch.Tensor:
    """The sampling filters in transformers' order; each one's neutral value skips it."""
    if temperature != 1.0:
        logits = apply_temperature(logits, temperature)
    if top_k > 0:
        logits = top_k_filter(logits, top_k)
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    if min_p > 0.0:
        logits = min_p_filter(logits, min_p)
    return logits


def choose_next(logits: torch.Tensor, seen: torch.Tensor, temperature: float = 0.0, top_k: int = 0,
                top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]. temperature 0 means greedy (argmax; first index on ties, as torch
    and transformers both do). Without a generator the draw uses torch's global RNG, like transformers."""
    logits = logits.float()
    if repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = warp(logits, temperature, top_k, top_p, min_p).softmax(-1)  # [B, V], zeros where filtered
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int, top_p: float, min_p: float,
                        repetition_penalty: float):
    """Bad settings fail here, by name, rather than as NaN probabilities deep in the loop."""
    checks = [(max_new_tokens >= 0, "max_new_tokens", max_new_tokens, "must be >= 0"),
              (temperature >= 0, "temperature", temperature, "must be >= 0 (0 means greedy)"),
              (top_k >= 0, "top_k", top_k, "must be >= 0 (0 turns it off)"),
              (0 < top_p <= 1, "top_p", top_p, "must be in (0, 1] (1 turns it off)"),
              (0 <= min_p <= 1, "min_p", min_p, "must be in [0, 1] (0 turns it off)"),
              (repetition_penalty > 0, "repetition_penalty", repetition_penalty, "must be > 0 (1 turns it off)")]
    for ok, name, value, rule in checks:
        if not ok:
            raise ValueError(f"generate: {name}={value} {rule}")


# ----------------------------------------------------------------------------------------------------------------
# the decoding loop

def _prompt_tensor(input_ids: Sequence[int] | torch.Tensor, device) -> torch.Tensor:
    """[1, T] int64 on the model's device, from a list, a 1-D tensor or a [1, T] tensor."""
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"generate: input_ids must be one prompt (a list of ids, or a tensor [T] or [1, T]), "
                         f"got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("generate: input_ids is empty; the model needs at least one token to predict from")
    return ids[None]


@torch.inference_mode()
def generate(model, input_ids: Sequence[int] | torch.Tensor, max_new_tokens: int = 256, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             eos_token_ids: Sequence[int] = (), seed: int | None = None, generator: torch.Generator | None = None,
             stream: Callable[[int], None] | None = None) -> list[int]:
    """The new token ids (not the prompt), at most max_new_tokens, ending with the eos id if one was produced.
    `seed` makes sampling reproducible with a private generator; `generator` passes your own; with neither, the
    global RNG is used. `stream(token_id)` is called for every new token as soon as it is chosen, eos included.
    The model is put in eval mode for the call (LoRA dropout off) and restored after."""
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty)
    embed = model.model.embed_tokens.weight  # the activations' device and dtype, also under 4-bit loading
    ids = _prompt_tensor(input_ids, embed.device)  # [1, T]
    if generator is None and seed is not None:
        generator = torch.Generator(device=embed.device).manual_seed(seed)
    eos = set(int(e) for e in eos_token_ids)
    # the last token chosen is never fed back, so T + max_new_tokens - 1 positions suffice; one spare is harmless
    cache = KVCache(model.config, 1, ids.shape[1] + max_new_tokens, embed.device, embed.dtype)
    was_training = model.training
    model.eval()
    try:
        new: list[int] = []
        seen, step_input = ids, ids  # seen: every id so far, for the repetition penalty
        for _ in range(max_new_tokens):
            # only the last position predicts the next token: skip the LM head for the rest of the prefill
            hidden = model.hidden_states(step_input, cache=cache)[:, -1:]  # [1, 1, hidden]
            logits = model.logits(hidden)[:, -1]  # [1, V]
            token = choose_next(logits, seen, temperature, top_k, top_p, min_p, repetition_penalty, generator)
            token_id = int(token.item())  # one host sync per token: the eos test needs it anyway
            new.append(token_id)
            if stream is not None:
                stream(token_id)
            if token_id in eos:
                break
            step_input = token[:, None]  # [1, 1]
            if repetition_penalty != 1.0:
                seen = torch.cat([seen, step_input], dim=1)
        return new
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------------
# streaming text

class IncrementalDecoder:
    """Token ids in, text pieces out, without splitting a multi-byte character across pieces or losing the space
    that some tokenizers only restore in context (SentencePiece drops a leading '▁' at the start of a decode).

    The approach of vLLM's detokenizer: decode a short window ending at the new token, and emit what it adds over
    the same window without that token. Both decodes start at the same id, so context effects cancel. Text that
    ends in U+FFFD is an incomplete UTF-8 sequence (a byte-level token holding part of a character): hold it back
    until the next token completes it. `decode(ids) -> str` is the tokenizer's decode."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] is the context window already turned into text
        self.read = 0  # ids[:read] have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the very end comes out as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self.decode(self.ids[self.prefix:self.read])
        after = self.decode(self.ids[self.prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]
