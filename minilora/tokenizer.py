"""The tokenizer: text <-> token ids, giving the ids `transformers.AutoTokenizer` gives on the same directory.

A checkpoint ships its tokenizer as one of two files, and each has its own backend here:

    tokenizer.json    the `tokenizers` library, which runs the file's normalizer, pre-tokenizer, model (BPE,
                      Unigram, WordPiece), post-processor and decoder exactly as written
    tokenizer.model   sentencepiece, used only when there is no tokenizer.json (older Llama / Mistral repos)

The special tokens live in JSON files beside it, read the way transformers 5 reads them:

    tokenizer_config.json    bos_token, eos_token, pad_token, unk_token (a string or {"content": ...}), other
                             special tokens (additional_special_tokens, extra_special_tokens, any `*_token`),
                             add_bos_token / add_eos_token, chat_template
    special_tokens_map.json  legacy; overrides the above, but only when tokenizer_config.json has no
                             `added_tokens_decoder` (transformers' rule)
    generation_config.json   eos_token_id, an int or a list: every id that ends generation (Llama 3 stops on
                             <|eot_id|> and <|end_of_text|>, Qwen on <|im_end|> and <|endoftext|>)
    chat_template.jinja      the chat template; takes priority over tokenizer_config.json's chat_template

What `encode(text, add_special_tokens=True)` adds around the text:

    tokenizer.json    whatever its post-processor adds (Llama and Gemma: bos; Qwen and SmolLM2: nothing).
                      transformers 5 ignores add_bos_token / add_eos_token when tokenizer.json exists; so do we.
    tokenizer.model   bos if add_bos_token, eos if add_eos_token; both default to False, as in transformers.

Special tokens named in the config but missing from the vocabulary are added after it (new ids from
vocab_size up), as transformers adds them; a special token that appears in the text is always one id.

Known differences from transformers 5:
  - It rebuilds some tokenizers in Python (LlamaTokenizer, GemmaTokenizer, Qwen2Tokenizer) from the vocabulary
    instead of running tokenizer.json as written; we run the file, which those classes aim to reproduce (the
    tests find no difference on SmolLM2, Qwen2.5 and Gemma 3).
  - A bare tokenizer.model: sentencepiece applies the model's own normalizer spec (NFKC, collapsing whitespace,
    the "▁" dummy prefix), which transformers' conversion drops (and LlamaTokenizer puts the prefix only at the
    very start of the text, sentencepiece at the start of every stretch between special tokens). The two agree
    on models trained without them: identity normalization, whitespace kept, no dummy prefix. Checkpoints that
    ship both files are read through tokenizer.json.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

# Files that make up a tokenizer; `save` copies the ones present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")
NAMED_SPECIALS = ("bos_token", "eos_token", "pad_token", "unk_token")


class TokenizerError(ValueError):
    pass


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_str(value, where: str) -> str | None:
    """A special token as configs write it: "<s>", {"content": "<s>", ...} (AddedToken), or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{where}: expected a token string or {{\"content\": ...}}, got {value!r}")


class _JsonBackend:
    """tokenizer.json through `tokenizers`: it splits added tokens out of the text itself."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception with serde's message
            raise TokenizerError(f"{path}: cannot be read by the tokenizers library ({e})") from e

    def add_special_tokens(self, tokens: list[str]):
        from tokenizers import AddedToken
        present = {t.content for t in self.tok.get_added_tokens_decoder().values()}
        new = [AddedToken(t, special=True, normalized=False) for t in tokens if t not in present]
        if new:
            self.tok.add_special_tokens(new)

    def encode(self, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tok.encode(text, add_special_tokens=add_special_tokens)
        return enc.ids, enc.offsets

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    @property
    def special_ids(self) -> set[int]:
        return {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


def _proto_fields(buf: bytes):
    """(field number, value) pairs of a protobuf message: an int for varints, bytes for anything else."""
    def varint(i):
        v = shift = 0
        while True:
            b = buf[i]
            v, shift, i = v | (b & 0x7F) << shift, shift + 7, i + 1
            if b < 0x80:
                return v, i
    i = 0
    while i < len(buf):
        key, i = varint(i)
        wire = key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire == 2:  # length-delimited: strings and nested messages
            n, i = varint(i)
            value, i = buf[i:i + n], i + n
        else:  # fixed 32 / 64 bit (the float score)
            n = 4 if wire == 5 else 8
            value, i = buf[i:i + n], i + n
        yield key >> 3, value


class _SentencePieceBackend:
    """tokenizer.model through sentencepiece. sentencepiece knows nothing of tokens added by the config, so the
    text is first split on the special tokens (longest first, as `tokenizers` matches added tokens) and only the
    pieces between them are sentencepiece-encoded."""

    def __init__(self, path: Path):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a sentencepiece model ({e})") from e
        n = self.sp.GetPieceSize()
        # <unk>, <s>, </s> (control / unknown pieces) are special: matched in text, skipped by skip_special_tokens
        self.specials = {self.sp.IdToPiece(i): i for i in range(n) if self.sp.IsControl(i) or self.sp.IsUnknown(i)}
        self.added: dict[str, int] = {}  # special tokens from the config that the model lacks, ids from n up
        self._split_re = None

    def add_special_tokens(self, tokens: list[str]):
        for t in tokens:
            i = self.sp.PieceToId(t)
            if self.sp.IdToPiece(i) == t:  # in the model's vocabulary (PieceToId gives unk_id otherwise)
                self.specials[t] = i
            elif t not in self.added:
                self.added[t] = self.sp.GetPieceSize() + len(self.added)
        self._split_re = None

    def _splitter(self) -> re.Pattern:
        if self._split_re is None:
            names = sorted({**self.specials, **self.added}, key=len, reverse=True)
            self._split_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else re.compile("(?!)")
        return self._split_re

    def encode(self, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
        ids, offsets, pos = [], [], 0
        for part in self._splitter().split(text):  # [text, special, text, special, ..., text]
            if part in self.specials or part in self.added:
                ids.append(self.specials.get(part, self.added.get(part)))
                offsets.append((pos, pos + len(part)))
            elif part:
                self._encode_piece(part, pos, ids, offsets)
            pos += len(part)
        return ids, offsets

    def _encode_piece(self, text: str, pos: int, ids: list[int], offsets: list[tuple[int, int]]):
        # sentencepiece reports byte offsets into the UTF-8 text; turn them into character offsets
        char_at = [0] * (len(text.encode("utf-8")) + 1)
        b = 0
        for c, ch in enumerate(text):
            n = len(ch.encode("utf-8"))
            char_at[b:b + n] = [c] * n
            b += n
        char_at[b] = len(text)
        # the offsets are only in the protobuf result, read from its wire format so as not to need `protobuf`
        proto = self.sp.encode(text, out_type="serialized_proto")
        for field, piece in _proto_fields(proto):
            if field == 2:  # SentencePieceText.pieces: {1: piece, 2: id, 3: surface, 4: begin, 5: end}
                p = dict(_proto_fields(piece))
                ids.append(p.get(2, 0))
                offsets.append((pos + char_at[p.get(4, 0)], pos + char_at[p.get(5, 0)]))

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        by_id = {i: t for t, i in {**self.specials, **self.added}.items()}
        out, run = [], []
        for i in ids:  # sentencepiece decodes runs of ordinary ids; special tokens are written as themselves
            if i in by_id:
                out.append(self.sp.DecodeIds(run))
                run = []
                if not skip_special_tokens:
                    out.append(by_id[i])
            else:
                run.append(i)
        out.append(self.sp.DecodeIds(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        i = self.sp.PieceToId(token)
        return i if self.sp.IdToPiece(i) == token else None

    def id_to_token(self, i: int) -> str | None:
        if 0 <= i < self.sp.GetPieceSize():
            return self.sp.IdToPiece(i)
        return next((t for t, j in self.added.items() if j == i), None)

    @property
    def special_ids(self) -> set[int]:
        return set(self.specials.values()) | set(self.added.values())

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize() + len(self.added)


class Tokenizer:
    """ids = tok.encode(text); text = tok.decode(ids); tok.eos_token_ids is the stop set for generation."""

    def __init__(self, path: Path, backend, specials: dict[str, str | None], extra_specials: list[str],
                 add_bos: bool, add_eos: bool, generation_eos: list[int], chat_templates: dict[str, str]):
        self.path = path
        self.backend = backend
        backend.add_special_tokens([t for t in [*specials.values(), *extra_specials] if t])
        self.bos_token, self.eos_token = specials["bos_token"], specials["eos_token"]
        self.pad_token, self.unk_token = specials["pad_token"], specials["unk_token"]
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.unk_token_id = self.token_to_id(self.unk_token)
        if self.eos_token_id is None and generation_eos:  # no eos in the tokenizer config: the first stop id
            self.eos_token_id = generation_eos[0]
            self.eos_token = backend.id_to_token(self.eos_token_id)
        # every id that ends a generated turn: generation_config's list, plus the tokenizer's own eos
        self.eos_token_ids = list(dict.fromkeys(generation_eos + [i for i in [self.eos_token_id] if i is not None]))
        # padding is masked out of attention and loss, so any id works; eos is the usual fallback
        pad = self.token_to_id(self.pad_token)
        self.pad_token_id = pad if pad is not None else self.eos_token_id
        # only the sentencepiece backend adds these itself; a tokenizer.json's post-processor already has its own
        self.add_bos_token, self.add_eos_token = add_bos, add_eos
        self.chat_templates = chat_templates
        self.chat_template = chat_templates.get("default")
        self.vocab_size = backend.vocab_size

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"{path}: not a directory")
        config = _read_json(path / "tokenizer_config.json")
        if (path / "tokenizer.json").is_file():
            backend, add_bos, add_eos = _JsonBackend(path / "tokenizer.json"), False, False
        elif (path / "tokenizer.model").is_file():
            backend = _SentencePieceBackend(path / "tokenizer.model")
            add_bos, add_eos = bool(config.get("add_bos_token", False)), bool(config.get("add_eos_token", False))
        else:
            raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
        specials, extra = _special_tokens(path, config, backend)
        return cls(path, backend, specials, extra, add_bos, add_eos, _generation_eos(path), _chat_templates(path, config))

    def save(self, out_dir: str | Path):
        """Copy the tokenizer's files (and generation_config.json, which holds the stop ids) to `out_dir`, so an
        exported checkpoint loads with the same tokenizer. A later writer of generation_config.json may replace it."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (self.path / name).is_file() and (self.path / name).resolve() != (out_dir / name).resolve():
                shutil.copyfile(self.path / name, out_dir / name)
        if (self.path / "additional_chat_templates").is_dir():
            shutil.copytree(self.path / "additional_chat_templates", out_dir / "additional_chat_templates",
                            dirs_exist_ok=True)

    # ------------------------------------------------------------------------------------------------ encoding
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.encode_with_offsets(text, add_special_tokens)[0]

    def encode_with_offsets(self, text: str, add_special_tokens: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """ids and, for each, the (start, end) characters of `text` it covers. Tokens the post-processor adds
        (bos/eos) cover (0, 0) / (n, n). Gaps between tokens (whitespace a normalizer dropped, or that a ByteLevel
        post-processor trimmed off the token's offsets) go to the following token, so that a character span, e.g.
        an assistant turn, is covered by exactly the tokens that produce it."""
        ids, offsets = self.backend.encode(text, add_special_tokens)
        ids, offsets = list(ids), list(offsets)
        if isinstance(self.backend, _SentencePieceBackend) and add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None:
                ids, offsets = [self.bos_token_id] + ids, [(0, 0)] + offsets
            if self.add_eos_token and self.eos_token_id is not None:
                ids, offsets = ids + [self.eos_token_id], offsets + [(len(text), len(text))]
        prev_end = 0
        for k, (s, e) in enumerate(offsets):
            if e > s:
                offsets[k] = (min(s, prev_end), e)
                prev_end = e
        return ids, offsets

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    @property
    def special_ids(self) -> set[int]:
        """Ids of the special tokens (bos, eos, pad, chat control tokens...): what skip_special_tokens drops."""
        return self.backend.special_ids

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        kind = "tokenizer.json" if isinstance(self.backend, _JsonBackend) else "tokenizer.model"
        return (f"Tokenizer({self.path}, {kind}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, stop ids={self.eos_token_ids})")


# ---------------------------------------------------------------------------------------------------- config
def _special_tokens(path: Path, config: dict, backend) -> tuple[dict[str, str | None], list[str]]:
    """(bos/eos/pad/unk strings, the other special tokens), from tokenizer_config.json and the legacy
    special_tokens_map.json. A bare tokenizer.model names its own bos/eos/unk (as transformers reads them)."""
    values = dict(config)
    where = {k: path / "tokenizer_config.json" for k in config}  # for error messages: the file each value is from
    if "added_tokens_decoder" not in config:  # transformers reads the legacy map only in this case
        legacy = _read_json(path / "special_tokens_map.json")
        values.update(legacy)
        where.update({k: path / "special_tokens_map.json" for k in legacy})
    specials = {k: _token_str(values.get(k), f"{where.get(k)}: {k}") for k in NAMED_SPECIALS}
    if isinstance(backend, _SentencePieceBackend):
        sp = backend.sp
        for key, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id())):
            if key not in values and i >= 0:
                specials[key] = sp.IdToPiece(i)
    extra = []
    for key in ("additional_special_tokens", "extra_special_tokens"):
        tokens = values.get(key) or []
        tokens = list(tokens.values()) if isinstance(tokens, dict) else tokens
        if not isinstance(tokens, list):
            raise TokenizerError(f"{where[key]}: {key} should be a list of tokens, got {tokens!r}")
        extra += [_token_str(t, f"{where[key]}: {key}") for t in tokens]
    # model-specific special tokens (mask_token; Gemma 3's image_token, boi_token, ...) are special too
    extra += [_token_str(v, f"{where[k]}: {k}") for k, v in values.items()
              if k.endswith("_token") and k not in NAMED_SPECIALS and isinstance(v, (str, dict))]
    # tokens a v4-era config lists with their ids but the tokenizer file lacks (normally none); transformers
    # adds them after the vocabulary
    for i, tok in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
        t = _token_str(tok, f"{path / 'tokenizer_config.json'}: added_tokens_decoder[{i}]")
        if t and backend.token_to_id(t) is None:
            extra.append(t)
    return specials, [t for t in extra if t]


def _generation_eos(path: Path) -> list[int]:
    where = path / "generation_config.json"
    eos = _read_json(where).get("eos_token_id")
    if eos is None:
        return []
    eos = [eos] if isinstance(eos, int) else eos
    if not isinstance(eos, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in eos):
        raise TokenizerError(f"{where}: eos_token_id should be an int or a list of ints, got {eos!r}")
    return eos


def _chat_templates(path: Path, config: dict) -> dict[str, str]:
    """Named chat templates; "default" is the one apply_chat_template uses without a name. tokenizer_config.json
    holds a string, or a list of {"name", "template"}; chat_template.jinja and additional_chat_templates/*.jinja
    (transformers' newer layout) take priority."""
    where = path / "tokenizer_config.json"
    raw = config.get("chat_template")
    if isinstance(raw, str):
        templates = {"default": raw}
    elif isinstance(raw, list):
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                   for t in raw):
            raise TokenizerError(f"{where}: chat_template list entries need string 'name' and 'template'")
        templates = {t["name"]: t["template"] for t in raw}
    elif isinstance(raw, dict):
        templates = dict(raw)
    elif raw is None:
        templates = {}
    else:
        raise TokenizerError(f"{where}: chat_template should be a string or a list, got {type(raw).__name__}")
    files = {}
    if (path / "chat_template.jinja").is_file():
        files["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if (path / "additional_chat_templates").is_dir():
        for f in sorted((path / "additional_chat_templates").glob("*.jinja")):
            files[f.stem] = f.read_text(encoding="utf-8")
    return files or templates
