"""Chat templates: a conversation rendered to text the way transformers' `apply_chat_template` renders it, and
the mask of which of its tokens are the assistant's, for training on responses only.

    text = render(tok.chat_template, messages, add_generation_prompt=True, bos_token=tok.bos_token, ...)
    ids, mask = encode_chat(tok, "chatml", messages)     # mask[i]: token i belongs to an assistant turn

A chat template is Jinja source shipped with the checkpoint. transformers renders it in a sandboxed Jinja
environment with trim_blocks / lstrip_blocks, the loopcontrols extension, a `tojson` that does not escape HTML,
and the globals `raise_exception` and `strftime_now` (transformers/utils/chat_template_utils.py); `render`
builds the same environment, so the text is identical.

Which tokens are the assistant's is read from the template itself, not from a marker string. For the assistant
message i, render
    prompt = messages[:i]    with add_generation_prompt=True    "...<|im_start|>assistant\\n"
    turn   = messages[:i+1]  without                            "...<|im_start|>assistant\\nHi!<|im_end|>\\n"
The answer starts where the two diverge: what the model sees when asked to generate vs. what it should
produce. It ends at the end of `turn` less trailing whitespace. The character spans become a token mask
through the tokenizer's offsets: a token is trained if it covers any character of a span.

Edge cases, and what happens:
  - ChatML's newline after <|im_end|> is not trained: the model stops at <|im_end|> and never generates it;
    it is part of the next turn's context.
  - Mistral's space between "[/INST]" and the answer is trained: sentencepiece / byte-level BPE glue it to the
    answer's first token ("▁Hello"), which the model must generate.
  - Templates that render an assistant turn differently once later messages follow (Qwen3 drops the
    reasoning of turns before the last user message): the answer starts where `prompt` says and ends at the
    first occurrence of the text the template writes after an answer (found by rendering the turn with other
    content). The answer itself must not contain that text.
  - Templates whose generation prompt is not how an assistant turn starts (a prompt that opens an empty
    <think></think> block the turn does not have) still work: the answer starts where the renders diverge.
  - A token that holds characters of both the prompt and the answer is trained; with the end-of-turn marker
    a special token (the normal case) spans are token-exact.
  - A conversation that opens with an assistant message needs a template that renders zero messages.
"""
from __future__ import annotations

import json
import os
from datetime import datetime

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Templates for checkpoints that ship none (base models), by the name of the format.
BUILTIN_TEMPLATES: dict[str, str] = {
    # teknium/OpenHermes-2.5-Mistral-7B tokenizer_config.json (also the example in transformers' chat template
    # docs); Qwen2.5 and SmolLM2 write the same turns, and like them it writes no bos.
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json without the tool-calling branches (tools,
    # builtin_tools, ipython / tool roles); date_string keeps its default of "26 Jul 2024".
    "llama-3.1": """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
""",
    # google/gemma-3-1b-it (and -270m-it, -4b-it) chat_template, unchanged: the system message is prepended to
    # the first user turn, the assistant role is called "model".
    "gemma": """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
""",
    # mistralai/Mistral-7B-Instruct-v0.2 and Mixtral-8x7B-Instruct-v0.1 tokenizer_config.json (the revision
    # that accepts a system message): [INST] turns, the answer closed by eos. It has no generation prompt: the
    # prompt already ends with " [/INST]".
    "mistral": """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
""",
    # The Stanford Alpaca prompt (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), made multi-turn the way
    # unsloth's "alpaca" chat template does: each answer closed by eos so the model learns to stop.
    "alpaca": """{{ bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {{- messages[0]['content'] + '\\n\\n' }}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {{- 'Below are some instructions that describe some tasks. Write responses that appropriately complete each request.\\n\\n' }}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {{- '### Instruction:\\n' + message['content'] + '\\n\\n' }}
    {%- elif message['role'] == 'assistant' %}
        {{- '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '### Response:\\n' }}
{%- endif %}
""",
}

# Messages may carry their reasoning under any of these names; templates read the first (transformers aliases).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}`, transformers' marker of assistant text, renders its body
    unchanged here (the spans come from prefix rendering), so templates that use it still compile."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & for HTML; chat templates want plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def compile_template(template: str) -> jinja2.Template:
    """Jinja source, or a name in BUILTIN_TEMPLATES, compiled in transformers' environment. Compiling takes
    ~20 ms and rendering ~0.1 ms: compile once and pass the result to `render`/`encode_chat` for many rows."""
    source = BUILTIN_TEMPLATES.get(template, template)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat template has a Jinja syntax error at line {e.lineno}: {e.message}") from e


def render(template: str | jinja2.Template, messages: list[dict], add_generation_prompt: bool = False,
           bos_token: str | None = None, eos_token: str | None = None, **extra) -> str:
    """The conversation as text, as `tokenizer.apply_chat_template(messages, tokenize=False)` gives it. The
    special tokens are passed to the template like transformers passes them (only the ones that are set);
    `extra` reaches the template too (tools, documents, date_string, enable_thinking, ...)."""
    compiled = compile_template(template) if isinstance(template, str) else template
    specials = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}
    extra = {"tools": None, "documents": None, **extra}
    return compiled.render(messages=_aliased(messages), add_generation_prompt=add_generation_prompt,
                           **specials, **extra)


def _aliased(messages: list[dict]) -> list[dict]:
    """Copies of the messages with reasoning under every name templates read it by (transformers does this)."""
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise TypeError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        out.append({"thinking": reasoning, **m, "reasoning_content": reasoning} if reasoning is not None else dict(m))
    return out


def template_tokens(tokenizer) -> dict[str, str]:
    """The special tokens a template may use, from a minilora Tokenizer (transformers' special_tokens_map)."""
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    return {k: getattr(tokenizer, k) for k in names if getattr(tokenizer, k, None) is not None}


# ---------------------------------------------------------------------------------------- responses only
def assistant_spans(template: str | jinja2.Template, messages: list[dict],
                    **kwargs) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the (start, end) characters of each assistant answer in it, end-of-turn
    marker included. kwargs go to `render` (bos_token, eos_token, ...)."""
    compiled = compile_template(template) if isinstance(template, str) else template
    text = render(compiled, messages, add_generation_prompt=False, **kwargs)
    spans = [_answer_span(compiled, messages, i, text, kwargs)
             for i, m in enumerate(messages) if m.get("role") == "assistant"]
    return text, spans


def _render_prefix(compiled, messages, i, generation_prompt, kwargs, why) -> str:
    try:
        return render(compiled, messages, add_generation_prompt=generation_prompt, **kwargs)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"assistant message {i}: the template fails on {why} ({e}); responses-only "
                         f"masking renders each assistant turn's prompt on its own") from e


def _answer_span(compiled, messages, i, text, kwargs) -> tuple[int, int]:
    prompt = _render_prefix(compiled, messages[:i], i, True, kwargs, f"the first {i} messages")
    turn = _render_prefix(compiled, messages[:i + 1], i, False, kwargs, f"the first {i + 1} messages")
    start = len(os.path.commonprefix([prompt, turn]))
    answer = turn[start:].rstrip()  # whitespace after the end-of-turn marker is glue, never generated
    if text[:start] != turn[:start]:
        raise ValueError(f"assistant message {i}: the template renders the conversation before it differently "
                         f"once later messages follow, so its answer cannot be located")
    if text.startswith(answer, start):
        return start, start + len(answer)
    # the turn renders differently once later messages follow (e.g. earlier reasoning dropped): it ends at the
    # first occurrence of what the template writes after an answer
    closing = _closing_text(compiled, messages, i, turn, kwargs)
    end = text.find(closing, start) if closing else -1
    if end < 0:
        raise ValueError(f"assistant message {i}: cannot find the end of its answer ({closing!r}) in the "
                         f"rendered conversation")
    return start, end + len(closing)


def _closing_text(compiled, messages, i, turn, kwargs) -> str:
    """What the template writes after an answer's content ("<|im_end|>", "<end_of_turn>", eos ...): the common
    end of the turn rendered with its content and with a different content."""
    content = str(messages[i].get("content") or "").rstrip()
    other = "y" if content.endswith("x") else "x"
    alt = render(compiled, messages[:i] + [{**messages[i], "content": other}], **kwargs)
    n = 0
    while n < min(len(turn), len(alt)) and turn[-1 - n] == alt[-1 - n]:
        n += 1
    return turn[len(turn) - n:].strip()


def encode_chat(tokenizer, template: str | jinja2.Template, messages: list[dict],
                **kwargs) -> tuple[list[int], list[bool]]:
    """(input_ids, assistant_mask) of a conversation: the ids `apply_chat_template(messages, tokenize=True)`
    gives (the rendered text, encoded without adding special tokens: the template writes bos itself), and
    True on the tokens of every assistant answer and its end-of-turn token(s). kwargs reach the template and
    override the tokenizer's special tokens."""
    text, spans = assistant_spans(template, messages, **{**template_tokens(tokenizer), **kwargs})
    ids, offsets = tokenizer.encode_with_offsets(text, add_special_tokens=False)
    mask = [e > s and any(s < b and e > a for a, b in spans) for s, e in offsets]
    return list(ids), mask
