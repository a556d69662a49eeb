"""minilora.chat_templates against transformers: rendered text identical to `apply_chat_template(tokenize=False)`,
token ids identical to `apply_chat_template(tokenize=True)`, and responses-only masks that pick out exactly each
assistant answer and its end-of-turn marker, for every built-in template and (slow) the real checkpoints'."""
from __future__ import annotations

import jinja2
import pytest
from test_tokenizer import load_both, write_bpe_dir

from minilora.chat_templates import BUILTIN_TEMPLATES, encode_chat, render, template_tokens

CONVERSATIONS = {
    "system+2 turns": [
        {"role": "system", "content": "You are terse. Answer in one line."},
        {"role": "user", "content": "Hi 😀, what's 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And in 日本語?\tPlease."},
        {"role": "assistant", "content": "四 (yon).\nThat's it."},
    ],
    "3 turns": [
        {"role": "user", "content": "Write a function."},
        {"role": "assistant", "content": "def f(x):\n    return x * 2"},
        {"role": "user", "content": "<|im_start|>Now explain it<|im_end|>"},  # control tokens in user text
        {"role": "assistant", "content": "It doubles x."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome 👍"},
    ],
}

# The text each format writes right after an answer: the end-of-turn marker the model must learn to emit.
# mistral and alpaca close answers with the tokenizer's eos.
END_OF_TURN = {"chatml": "<|im_end|>", "llama-3.1": "<|eot_id|>", "gemma": "<end_of_turn>",
               "mistral": None, "alpaca": None}

# Phi-3-style markers that the tiny tokenizer does not know as special tokens: the mask still comes from the
# template's structure.
PHI3_LIKE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")

# Qwen3-style: an assistant turn keeps its reasoning only after the last user message, so earlier turns render
# differently once later messages follow.
DROPS_REASONING = """{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{%- for m in messages %}
    {%- if m.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if loop.index0 > ns.last_user and m.reasoning_content %}
            {{- '<think>\\n' + m.reasoning_content + '\\n</think>\\n\\n' }}
        {%- endif %}
        {{- m.content + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{% endif %}"""

# ChatML with transformers' {% generation %} markers around each answer: transformers' own assistant mask is then
# an oracle for ours, token by token.
CHATML_TAGGED = ("{% for message in messages %}{% if message['role'] == 'assistant' %}"
                 "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
                 "{% endgeneration %}{{ '\\n' }}{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + "
                 "message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_both(write_bpe_dir(tmp_path_factory.mktemp("chat") / "bpe"))


def assert_renders_like_transformers(ref, tok, template, messages, **kwargs):
    """`template=None`: the tokenizer's own."""
    for gen in (False, True):
        extra = {} if template is None else {"chat_template": template}
        expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **extra, **kwargs)
        got = render(template or tok.chat_template, messages, add_generation_prompt=gen,
                     **template_tokens(tok), **kwargs)
        assert got == expected, f"add_generation_prompt={gen}\nexpected {expected!r}\ngot      {got!r}"


def masked_runs(tok, ids, mask) -> list[str]:
    """The decoded text of each maximal run of masked tokens."""
    runs, run = [], []
    for i, m in zip(ids, mask):
        if m:
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    return [tok.decode(r) for r in runs + ([run] if run else [])]


def assert_masks_answers(ref, tok, template, messages, end_of_turn, expected_answers=None):
    ids, mask = encode_chat(tok, template, messages)
    expected_ids = ref.apply_chat_template(messages, tokenize=True, chat_template=template, return_dict=True)
    assert ids == list(expected_ids["input_ids"])  # the ids transformers would train on
    answers = expected_answers or [m["content"] + end_of_turn for m in messages if m["role"] == "assistant"]
    runs = masked_runs(tok, ids, mask)
    print(f"{sum(mask)} of {len(ids)} tokens trained: {runs}")
    assert len(runs) == len(answers), runs
    for run, answer in zip(runs, answers):
        # [/INST] then " answer": the separating space rides on the answer's first token, which the model
        # must generate (sentencepiece "▁4", byte-level "Ġ4"); nothing else may lead or trail
        assert run == answer or run == " " + answer, f"masked {run!r}, expected {answer!r}"


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_builtin_templates_render_like_transformers(tiny, name, conversation):
    ref, tok = tiny
    assert_renders_like_transformers(ref, tok, BUILTIN_TEMPLATES[name], CONVERSATIONS[conversation])


def test_template_kwargs_reach_the_template(tiny):
    ref, tok = tiny
    msgs = CONVERSATIONS["system+2 turns"]
    assert_renders_like_transformers(ref, tok, BUILTIN_TEMPLATES["llama-3.1"], msgs, date_string="01 Jan 2025")
    assert "01 Jan 2025" in render("llama-3.1", msgs, date_string="01 Jan 2025")  # names resolve to built-ins


def test_jinja_environment_matches_transformers(tiny):
    """The pieces of transformers' environment templates rely on: trim_blocks/lstrip_blocks, loop controls,
    tojson without HTML escaping, namespace, {% generation %}, raise_exception."""
    ref, tok = tiny
    template = """{% for m in messages %}
    {% if m.role == 'system' %}{% continue %}{% endif %}
    {% generation %}{{ m | tojson }}{% endgeneration %}
    {% if loop.index > 3 %}{% break %}{% endif %}
{% endfor %}
{{ {'html': '<b>&</b>'} | tojson(indent=2) }}{{ bos_token }}|{{ eos_token }}"""
    assert_renders_like_transformers(ref, tok, template, CONVERSATIONS["system+2 turns"])
    with pytest.raises(jinja2.exceptions.TemplateError, match="Conversation roles must alternate"):
        render("gemma", [{"role": "assistant", "content": "first"}])
    assert render("{{ strftime_now('%Y') | length }}", []) == "4"


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_builtin_template_masks(tiny, name, conversation):
    ref, tok = tiny
    end = END_OF_TURN[name] or tok.eos_token
    assert_masks_answers(ref, tok, BUILTIN_TEMPLATES[name], CONVERSATIONS[conversation], end)


def test_masks_without_special_markers(tiny):
    ref, tok = tiny
    assert_masks_answers(ref, tok, PHI3_LIKE, CONVERSATIONS["3 turns"], "<|end|>")


def test_masks_when_earlier_reasoning_is_dropped(tiny):
    ref, tok = tiny
    msgs = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4.", "reasoning_content": "Two and two."},
            {"role": "user", "content": "3+3?"},
            {"role": "assistant", "content": "6.", "reasoning_content": "Three and three."}]
    # the first answer is trained as it appears in the conversation (reasoning gone), the last with its reasoning
    answers = ["4.<|im_end|>", "<think>\nThree and three.\n</think>\n\n6.<|im_end|>"]
    assert_masks_answers(ref, tok, DROPS_REASONING, msgs, "<|im_end|>", expected_answers=answers)


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_mask_equals_transformers_generation_mask(tiny, conversation):
    ref, tok = tiny
    msgs = CONVERSATIONS[conversation]
    ids, mask = encode_chat(tok, CHATML_TAGGED, msgs)
    out = ref.apply_chat_template(msgs, tokenize=True, chat_template=CHATML_TAGGED, return_dict=True,
                                  return_assistant_tokens_mask=True)
    assert ids == list(out["input_ids"])
    diff = [k for k, (a, b) in enumerate(zip(mask, out["assistant_masks"])) if bool(a) != bool(b)]
    print(f"{sum(mask)} masked tokens, {len(diff)} differ from transformers' generation mask")
    assert not diff


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"])
def test_real_checkpoint_templates(real_hf_dir, name):
    """SmolLM2 and Qwen2.5 ship ChatML templates; gemma-3-270m is a base model without one: the built-in."""
    ref, tok = load_both(real_hf_dir(name))
    template = tok.chat_template or BUILTIN_TEMPLATES["gemma"]
    assert (tok.chat_template is None) == (name == "gemma-3-270m")
    for msgs in CONVERSATIONS.values():
        assert_renders_like_transformers(ref, tok, template if name == "gemma-3-270m" else None, msgs)
        end = "<end_of_turn>" if name == "gemma-3-270m" else "<|im_end|>"
        assert_masks_answers(ref, tok, template, msgs, end)
