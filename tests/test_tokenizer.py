"""minilora.tokenizer against transformers.AutoTokenizer on the same directory: token ids with and without special
tokens, decoding, special-token attributes, offsets, save/load, and the errors for broken directories.

Tokenizers under test: a byte-level BPE trained here with `tokenizers` (tokenizer.json + tokenizer_config.json),
the same with a legacy special_tokens_map.json and no post-processor, a sentencepiece model trained here (a bare
tokenizer.model), and (slow) the three real checkpoints' tokenizers."""
from __future__ import annotations

import functools
import json
import warnings

import pytest

from minilora.tokenizer import Tokenizer, TokenizerError

REAL = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"]

TEXTS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\n",
    "whitespace runs:      end",
    "日本語のテキスト, 中文, 한국어",
    "emoji 😀👍🏽 and a flag 🇫🇷",
    "def f(x):\n    return x ** 2  # comment\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<s> special tokens </s> in text",
    "<bos><start_of_turn>model\nok<end_of_turn>",
    "<|endoftext|><|endoftext|>x",
    "",
    " ",
    "\u00a0nbsp and zero\u200bwidth",
    "1234567 3.14159 -42",
]

# Control tokens of every chat format, so the tiny tokenizer can encode each built-in template's markup.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|eot_id|>",
            "<|start_header_id|>", "<|end_header_id|>", "<s>", "</s>", "<bos>", "<eos>", "<start_of_turn>",
            "<end_of_turn>"]
CORPUS = ["Hello world! This is a tiny corpus for a tiny tokenizer.", "def f(x):\n    return x * 2\n",
          "The answer is 42.\tTabs\n\nnewlines", "日本語のテキスト 😀", "What's the capital of France? Paris."] * 20


def write_bpe_dir(path, bos_post_processor: bool = True, legacy_map: bool = False):
    """A byte-level BPE (GPT-2 / Llama 3 style) trained on CORPUS, saved as tokenizer.json + tokenizer_config.json.
    bos_post_processor: tokenizer.json adds <|begin_of_text|> (Llama 3); else it has no post-processor (Qwen).
    legacy_map: special tokens in special_tokens_map.json instead of tokenizer_config.json."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos_post_processor:
        bos = ("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                                           special_tokens=[bos])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    specials = {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>", "__type": "AddedToken"},
                "pad_token": "<pad>"}  # <pad> is not in the vocabulary: both add it after it
    config = {"add_bos_token": True, "add_eos_token": True,  # ignored by transformers 5 next to tokenizer.json
              "chat_template": [{"name": "default", "template": "{{ messages }}"}, {"name": "tool_use", "template": "t"}]}
    if legacy_map:
        (path / "special_tokens_map.json").write_text(json.dumps(specials))
    else:
        config.update(specials)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    stop = [tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|endoftext|>")]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": stop}))
    return path


def write_sentencepiece_dir(path):
    """A bare tokenizer.model trained with sentencepiece the way Llama's was (BPE, byte fallback, no normalization,
    whitespace kept). No dummy prefix: transformers' conversion of a bare tokenizer.model drops it."""
    import sentencepiece as spm
    path.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(path / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, minloglevel=2)
    (path / "tokenizer.vocab").unlink()
    return path


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    dirs = {"bpe": write_bpe_dir(root / "bpe"),
            "bpe-legacy-map": write_bpe_dir(root / "bpe_legacy", bos_post_processor=False, legacy_map=True)}
    try:
        import google.protobuf  # noqa: F401  (transformers needs it to convert a sentencepiece model)
        dirs["sentencepiece"] = write_sentencepiece_dir(root / "sp")
    except ImportError:
        pass
    return dirs


def auto_tokenizer(path):
    from transformers import AutoTokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(str(path))


@functools.lru_cache(maxsize=None)
def load_both(path) -> tuple:
    """(transformers' tokenizer, ours) for a directory, loaded once per test session: the real Gemma 3 tokenizer
    (262k tokens) takes seconds to load, and both test files use it."""
    return auto_tokenizer(path), Tokenizer.from_dir(path)


def compare_with_transformers(path, texts=TEXTS):
    ref, tok = load_both(path)
    mismatches = []
    for text in texts:
        for special in (True, False):
            a, b = ref(text, add_special_tokens=special).input_ids, tok.encode(text, add_special_tokens=special)
            if a != b:
                mismatches.append(f"encode({text!r}, add_special_tokens={special}): transformers {a}, minilora {b}")
        ids = ref(text).input_ids
        for skip in (False, True):
            a, b = ref.decode(ids, skip_special_tokens=skip), tok.decode(ids, skip_special_tokens=skip)
            if a != b:
                mismatches.append(f"decode({ids}, skip_special_tokens={skip}): transformers {a!r}, minilora {b!r}")
    print(f"{path.name}: {len(texts)} texts, {len(mismatches)} mismatches")
    assert not mismatches, "\n".join(mismatches)
    # the special tokens and their ids
    for name in ("bos_token", "eos_token", "bos_token_id", "eos_token_id"):
        assert getattr(tok, name) == getattr(ref, name), name
    assert tok.pad_token_id == (ref.pad_token_id if ref.pad_token_id is not None else ref.eos_token_id)
    assert tok.vocab_size == len(ref)
    assert set(ref.all_special_ids) <= tok.special_ids
    return ref, tok


@pytest.mark.parametrize("kind", ["bpe", "bpe-legacy-map", "sentencepiece"])
def test_ids_match_transformers(tiny_dirs, kind):
    if kind not in tiny_dirs:
        pytest.skip("protobuf is not installed: transformers cannot convert a sentencepiece model")
    ref, tok = compare_with_transformers(tiny_dirs[kind])
    if kind.startswith("bpe"):
        gen = json.loads((tiny_dirs[kind] / "generation_config.json").read_text())["eos_token_id"]
        assert tok.eos_token_ids == gen  # the stop set; <|eot_id|> (the eos) is already first in it
        assert tok.chat_template == "{{ messages }}" and set(tok.chat_templates) == {"default", "tool_use"}
        assert tok.chat_templates == ref.chat_template  # transformers keeps named templates as a dict


def test_offsets_cover_the_text(tiny_dirs):
    for kind, path in tiny_dirs.items():
        tok = Tokenizer.from_dir(path)
        for text in TEXTS:
            ids, offsets = tok.encode_with_offsets(text)
            assert len(ids) == len(offsets) and ids == tok.encode(text, add_special_tokens=False)
            # the spans cover the text in order with no gap (tokens that split a character into bytes overlap)
            pos, start = 0, 0
            for s, e in offsets:
                assert start <= s <= pos and s <= e, (kind, text, offsets)
                pos, start = max(pos, e), s
            assert pos == len(text), (kind, text, offsets)
            # a special token's span is its own text
            for i, (s, e) in zip(ids, offsets):
                if i in tok.special_ids:
                    assert text[s:e] == tok.id_to_token(i)


def test_save_round_trip(tiny_dirs, tmp_path):
    for kind, path in tiny_dirs.items():
        tok = Tokenizer.from_dir(path)
        tok.save(tmp_path / kind)
        again = Tokenizer.from_dir(tmp_path / kind)
        assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
        assert (again.eos_token_ids, again.pad_token_id, again.chat_templates) == \
               (tok.eos_token_ids, tok.pad_token_id, tok.chat_templates)
        ref = auto_tokenizer(tmp_path / kind)  # what we write, transformers reads the same way
        assert [ref(t).input_ids for t in TEXTS] == [tok.encode(t) for t in TEXTS]


def test_chat_template_file_takes_priority(tiny_dirs, tmp_path):
    Tokenizer.from_dir(tiny_dirs["bpe"]).save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ 'from the file' }}")
    assert Tokenizer.from_dir(tmp_path).chat_template == auto_tokenizer(tmp_path).chat_template == "{{ 'from the file' }}"


def test_errors_name_the_file(tiny_dirs, tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"')  # cut short
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    good = tmp_path / "good"
    Tokenizer.from_dir(tiny_dirs["bpe"]).save(good)
    (good / "tokenizer_config.json").write_text("{bad json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.from_dir(good)
    (good / "tokenizer_config.json").write_text(json.dumps({"eos_token": 5}))
    with pytest.raises(TokenizerError, match="eos_token"):
        Tokenizer.from_dir(good)
    (good / "tokenizer_config.json").write_text("{}")
    (good / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(TokenizerError, match="generation_config.json: eos_token_id"):
        Tokenizer.from_dir(good)


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL)
def test_real_tokenizers_match_transformers(real_hf_dir, name):
    ref, tok = compare_with_transformers(real_hf_dir(name))
    assert tok.chat_template == ref.chat_template
    gen = json.loads((real_hf_dir(name) / "generation_config.json").read_text())["eos_token_id"]
    assert tok.eos_token_ids[0] == (gen if isinstance(gen, int) else gen[0])
