"""Chat templates: lora_np.chat_template against transformers' renderer (jinja2), byte for byte.

- the real templates of the families lora_np loads (tests/data/chat_templates/, sources in its
  README): rendered text equal to transformers.utils.chat_template_utils.render_jinja_template for
  fixed conversations (system or not, multi-turn, Qwen3 reasoning and enable_thinking, tools) and
  hypothesis contents; the same errors where the template raises;
- jinja2's whitespace, scoping and expression rules on small templates;
- constructs outside the subset refused by name and line;
- Tokenizer.apply_chat_template (text and ids) against PreTrainedTokenizerFast.apply_chat_template
  for a small trained tokenizer carrying each family's template and special tokens, and the
  `{"messages"}` training rows: labels on each assistant turn and its end-of-turn token only.
"""
import json
import re
import os

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conftest import ROOT, crosscheck
from lora_np.chat_template import ChatTemplate, ChatTemplateError, ChatTemplateSyntaxError, render_chat
from lora_np.data import IGNORE_INDEX, end_of_turn_id, load_examples
from lora_np.tokenizer import load_tokenizer

TEMPLATES_DIR = os.path.join(ROOT, "tests", "data", "chat_templates")
FAMILIES = sorted(f[:-len(".jinja")] for f in os.listdir(TEMPLATES_DIR) if f.endswith(".jinja"))
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def template(name):
    with open(os.path.join(TEMPLATES_DIR, name + ".jinja"), encoding="utf-8", newline="") as fh:
        return fh.read()


def reference(source, messages, **kwargs):
    """transformers' rendering: ("ok", text) or ("error", exception type, message)."""
    crosscheck("jinja2")
    from jinja2.exceptions import TemplateError, TemplateSyntaxError
    from transformers.utils.chat_template_utils import render_jinja_template
    try:
        (text,), _ = render_jinja_template([messages], chat_template=source, **kwargs)
    except TemplateSyntaxError as e:
        return ("error", ChatTemplateSyntaxError, str(e))
    except TemplateError as e:
        return ("error", ChatTemplateError, str(e))
    except (TypeError, ValueError) as e:
        return ("error", type(e), str(e))
    return ("ok", text)


def ours(source, messages, add_generation_prompt=False, tools=None, documents=None, **kwargs):
    special = {k: kwargs.pop(k) for k in list(kwargs) if k.endswith("_token")}
    try:
        return ("ok", render_chat(source, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                  documents=documents, special_tokens=special, **kwargs))
    except ChatTemplateError as e:
        return ("error", type(e), str(e))
    except (TypeError, ValueError) as e:
        return ("error", type(e), str(e))


def check_same(source, messages, **kwargs):
    want, got = reference(source, messages, **kwargs), ours(source, messages, **kwargs)
    if want[0] == "error" and want[1] is not ChatTemplateError:
        assert got[:2] == want[:2], (want, got)  # same exception type; Python's or jinja2's wording
    else:
        assert got == want


# -- the families' templates ------------------------------------------------------------------------

SYSTEM = {"role": "system", "content": "You are terse."}
U1, A1 = {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"}
U2 = {"role": "user", "content": "What is 2+2?\nAnswer briefly."}
A2_THINK = {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"}
TOOL_CALL = {"role": "assistant", "content": "",
             "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]}
TOOL_RESULT = {"role": "tool", "content": "4"}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer", "description": "ü"}},
    "required": ["a", "b"]}}}]

CONVERSATIONS = {
    "user": [U1],
    "system_user": [SYSTEM, U1],
    "multi_turn": [SYSTEM, U1, A1, U2],
    "ends_with_assistant": [U1, A1],
    "reasoning": [U1, A1, U2, A2_THINK],
    "reasoning_then_user": [U1, A2_THINK, U2],
    "reasoning_content_field": [U1, {"role": "assistant", "content": "4", "reasoning_content": "Add them."}],
    "not_alternating": [U1, U2],
    "assistant_first": [A1, U1],
    "odd_contents": [{"role": "user", "content": "  {{ x }} {% if %} {# #} 'q' \"dq\" \\n\t\n"},
                     {"role": "assistant", "content": "\n\n  }} ~ | é 😀  "}, {"role": "user", "content": ""}],
    "tool_use": [U2, TOOL_CALL, TOOL_RESULT],
}


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("family", FAMILIES)
def test_family_templates_match_transformers(family, conversation, generation_prompt):
    source = template(family)
    for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True}) \
            if family in ("qwen3", "smollm3") else ({},):
        check_same(source, CONVERSATIONS[conversation], add_generation_prompt=generation_prompt, **SPECIAL, **kwargs)


@pytest.mark.parametrize("family", ["qwen2_5", "qwen3", "llama3_1", "llama3_2", "mistral_nemo", "granite3_3",
                                    "smollm3"])
def test_tools_and_documents_match_transformers(family):
    """tojson (indent, non-ASCII), tool calls and results, documents, template kwargs."""
    source = template(family)
    messages = [U2, TOOL_CALL, TOOL_RESULT] if family != "mistral_nemo" else [U2]
    check_same(source, messages, tools=TOOLS, add_generation_prompt=True, **SPECIAL)
    check_same(source, [U1], documents=[{"doc_id": 7, "title": "t", "text": "Some text."}], **SPECIAL)
    check_same(source, [U1], add_generation_prompt=True, controls={"citations": True}, thinking=True,
               xml_tools=["t1", "t2"], builtin_tools=["brave_search", "code_interpreter"], **SPECIAL)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "mistral_nemo"])
def test_role_errors_are_the_templates_messages(family):
    source = template(family)
    with pytest.raises(ValueError, match="Conversation roles must alternate|must alternate"):
        render_chat(source, [U1, U2], special_tokens=SPECIAL)
    check_same(source, [U1, U2], **SPECIAL)


message_text = st.text(st.characters(codec="utf-8"), max_size=30)


@settings(max_examples=60)
@given(family=st.sampled_from(FAMILIES), system=st.one_of(st.none(), message_text),
       turns=st.lists(st.tuples(message_text, message_text), min_size=1, max_size=3),
       last_user=st.one_of(st.none(), message_text), generation_prompt=st.booleans())
def test_any_contents_match_transformers(family, system, turns, last_user, generation_prompt):
    messages = ([] if system is None else [{"role": "system", "content": system}]) + [
        m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    if last_user is not None:
        messages.append({"role": "user", "content": last_user})
    check_same(template(family), messages, add_generation_prompt=generation_prompt, **SPECIAL)


def test_render_chat_reads_messages_as_transformers():
    with pytest.raises(ValueError, match="empty conversation"):
        render_chat(template("qwen3"), [])
    source = template("qwen3")
    messages = [U1, {"role": "assistant", "content": "4", "thinking": "Add them.", "tool_calls": None}]
    check_same(source, messages, **SPECIAL)  # None dropped, thinking -> reasoning_content
    with pytest.raises(TypeError, match=r"messages\[0\]"):
        render_chat(source, [{"role": "user", "content": object()}])


# -- jinja2's rules on small templates ------------------------------------------------------------

SNIPPETS = [
    # whitespace: trim_blocks, lstrip_blocks, -, +, comments, a trailing newline, \r\n
    "a\n  {% if true %}\n    b\n  {% endif %}\nc\n",
    "a  {%- if true -%}  b  {%- endif -%}  c",
    "a\n\t {%+ if true %}b{% endif +%}\nc",
    "a\n   {# note #}\nb {#- x -#}   c\n\n",
    "x{{- ' y ' -}}  \n z {{ 1 }}\n",
    "l1\r\n  {% if true %}\r\nl2\r\n{% endif %}\r\n",
    "{% for i in [1, 2] %}\n  {{ i }}\n{% endfor %}\n",
    "  {{ 'var tags are not lstripped' }}\n{% set x = 1 %}  {{ x }}",
    # scoping: a loop body is a scope per iteration, if is not; namespace
    "{% for i in [1, 2] %}[{{ x }}]{% set x = i %}{% endfor %}|{{ x }}",
    "{% set x = 0 %}{% for i in [1, 2] %}[{{ x }}]{% set x = i %}{% endfor %}|{{ x }}",
    "{% if true %}{% set y = 3 %}{% endif %}{{ y }}",
    "{% set ns = namespace(n=0, s='') %}{% for c in 'abc' %}{% set ns.n = ns.n + 1 %}{% set ns.s = ns.s ~ c %}"
    "{% endfor %}{{ ns.n }}{{ ns.s }}",
    "{% set ns = namespace() %}{% set ns.k = 'v' %}{{ ns.k }}{{ ns.missing is defined }}",
    # loops
    "{% for x in [3, 4, 5] if x != 4 %}{{ loop.index }}{{ loop.index0 }}{{ loop.first }}{{ loop.last }}"
    "{{ loop.length }}{{ loop.revindex }}{{ loop.cycle('a', 'b') }}{{ loop.previtem }}{{ loop.nextitem }};"
    "{% endfor %}",
    "{% for x in [] %}x{% else %}empty{% endfor %}{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}={{ v }} "
    "{% endfor %}",
    "{% for x in range(10) %}{% if x == 2 %}{% continue %}{% endif %}{% if x > 4 %}{% break %}{% endif %}{{ x }}"
    "{% endfor %}",
    "{% for x in [1, 2] %}{% for y in [3] %}{{ loop.index }}{% set z = 1 %}{% endfor %}{{ loop.index }}{{ z }}"
    "{% endfor %}",
    "{% for m in messages[::-1] %}{{ m }}{% endfor %}{{ messages[1:] }}{{ messages[:-1] }}{{ 'abc'[1] }}",
    # expressions
    "{{ 1 + 2 * 3 - 4 / 2 }} {{ 7 // 2 }} {{ 7 % 3 }} {{ 2 ** 3 ** 2 }} {{ -3 + +2 }} {{ 1.5e2 }} {{ 1_000 }}",
    "{{ 'a' ~ 1 ~ none ~ u }} {{ 'x' 'y' }} {{ 'a\\nb\\'c\\u00e9' }} {{ \"d\\\"q\" }}",
    "{{ 1 < 2 < 3 }} {{ 3 > 2 > 2 }} {{ 'a' in 'cat' }} {{ 'z' not in ['a'] }} {{ not 1 == 2 }}",
    "{{ u or 'default' }} {{ 0 and 'no' }} {{ 'yes' if true }}|{{ 'yes' if false }}|{{ 'a' if false else 'b' }}",
    "{{ [1, 'a', none, true, 1.0, [2]] }} {{ {'k': 'v', 'n': 1} }} {{ (1, 2) }} {{ (1,) }} {{ () }}",
    "{{ 'AbC'.lower() }}{{ ' s '.strip() }}{{ 'a,b'.split(',') }}{{ 'xxy'.rstrip('y') }}{{ 'ab'.startswith('a') }}"
    "{{ 'ab'.endswith(('x', 'b')) }}{{ 'a-b'.replace('-', '+') }}{{ {'a': 1}.get('b', 2) }}{{ 'abca'.find('c') }}",
    "{{ u }}|{{ u is defined }}{{ u is undefined }}{{ u|length }}{{ u|default('d') }}{{ ''|default('e', true) }}"
    "{{ 'x' in u }}{{ u is iterable }}{{ u == u }}{{ u is none }}",
    "{{ messages[0].role }}{{ messages[0]['content'] }}{{ messages[0].missing is defined }}{{ messages[9] is defined }}"
    "{{ messages|length }}",
    # filters and tests
    "{{ '  t  '|trim }}|{{ 'xxtxx'|trim('x') }}|{{ [1, 2]|join('-') }}|{{ messages|map(attribute='role')|join }}|"
    "{{ [3, 1]|first }}{{ [3, 1]|last }}|{{ 'ab'|upper }}{{ 'AB'|lower }}{{ 'ab cd'|capitalize }}|"
    "{{ 'aXa'|replace('a', 'b') }}|{{ '3'|int + 1 }}|{{ 'x'|int }}|{{ '2.5'|float }}|{{ -2|abs }}|{{ 12|string }}",
    "{{ {'a': [1, 'é'], 'b': none}|tojson }} {{ [1, {'k': 2}]|tojson(indent=2) }} {{ {'b': 1, 'a': 2}|tojson("
    "sort_keys=true, separators=(',', ':')) }}",
    "{{ messages|selectattr('role', 'equalto', 'user')|list }}{{ messages|rejectattr('role', 'eq', 'user')|list }}"
    "{{ [0, 1, 2, 3]|select('odd')|list }}{{ [0, 1, 2]|reject|list }}{{ [1, 2]|map('string')|list }}"
    "{% for k, v in {'x': 1}|items %}{{ k }}{{ v }}{% endfor %}{{ u|items|list }}{{ 'ab'|list }}",
    "{{ 1 is number }}{{ true is number }}{{ true is integer }}{{ 1.0 is float }}{{ 'a' is string }}"
    "{{ {} is mapping }}{{ 'a' is iterable }}{{ 1 is iterable }}{{ [1] is sequence }}{{ true is boolean }}"
    "{{ true is sameas true }}{{ 1 is sameas true }}{{ 6 is divisibleby 3 }}{{ 6 is divisibleby(4) }}"
    "{{ 2 is even }}{{ 'a' is in 'abc' }}{{ 'A' is upper }}{{ 2 is gt 1 }}{{ none is none }}{{ 1 is not none }}",
    "{{ dict(a=1, b='x') }} {{ dict.fromkeys(['a', 'b'], 0) }} {{ range(3)|list }} {{ range(1, 7, 2)|list }}",
    "{% set a, b = [1, 2] %}{{ b }}{{ a }}{% set t = 1, 2 %}{{ t }}",
    "{% generation %}{% set g = 1 %}gen{% endgeneration %}{{ g is defined }}",
    "{% for i in [1] %}{{ messages|length }}{% endfor %}{% set messages = 1 %}{{ messages }}",
    "{% for i in [1] %}{{ messages|length }}{% endfor %}{% if true %}{% set messages = 1 %}{% endif %}",
    "{% for i in [1] %}{% for j in [1] %}{{ bos_token }}{% endfor %}{% set bos_token = 3 %}{% endfor %}{{ bos_token }}",
]


@pytest.mark.parametrize("snippet", SNIPPETS)
def test_snippets_match_jinja2(snippet):
    check_same(snippet, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], **SPECIAL)


ERRORS = [
    "{{ raise_exception('stop: ' ~ messages|length) }}",
    "{{ u + 'x' }}",
    "{{ u.attr }}",
    "{{ u[0] }}",
    "{{ u() }}",
    "{{ 'a' + 1 }}",
    "{% set x = 1 %}{% set x.attr = 2 %}",
    "{% set ns = namespace(_hidden=1) %}",
    "{{ 1|items|list }}",
    "{{ 5 < 'a' }}",
]


@pytest.mark.parametrize("snippet", ERRORS)
def test_errors_match_jinja2(snippet):
    want = reference(snippet, [U1], **SPECIAL)
    assert want[0] == "error", want
    check_same(snippet, [U1], **SPECIAL)


def test_raise_exception_is_a_value_error_with_the_message():
    with pytest.raises(ValueError, match="^System role not supported$"):
        render_chat(template("gemma2"), [SYSTEM, U1])


REFUSED = [
    ("{% macro m() %}x{% endmacro %}", "line 1: '{% macro %}'"),
    ("ok\n{% include 'x.jinja' %}", "line 2: '{% include %}'"),
    ("{{ 'x'|safe }}", "the filter 'safe'"),
    ("{{ 'x'|wordcount }}", "the filter 'wordcount'"),
    ("\n\n{{ x is escaped }}", "line 3: the test 'escaped'"),
    ("{{ '{}'.format(1) }}", r"the method str.format\(\)"),
    ("{{ messages.append(1) }}", r"the method list.append\(\)"),
    ("{{ cycler('a') }}", "the global 'cycler'"),
    ("{% raw %}{{ x }}{% endraw %}", "raw"),
    ("{% set x %}block{% endset %}", "block set"),
    ("{% for x in [1] recursive %}{% endfor %}", "recursive"),
    ("{% for x in [1] %}{{ loop.changed(x) }}{% endfor %}", "loop.changed"),
    ("{{ namespace() }}", "printing a Namespace"),
    ("{{ [1]|select }}", "printing a generator"),
    ("{{ f(*args) }}", r"\*args"),
    ("{{ (1).real }}", "the attribute int.real"),
]


@pytest.mark.parametrize("snippet, message", REFUSED)
def test_unsupported_constructs_are_refused_by_name(snippet, message):
    with pytest.raises(NotImplementedError, match=message):
        render_chat(snippet, [U1])


@pytest.mark.parametrize("snippet, message", [
    ("a\n{% if true %}b", r"line 2: '\{% if %\}' is never closed"), ("{% frobnicate %}", "line 1: unknown tag"),
    ("{{ (1 }}", "line 1"), ("\n{{ 1 + }}", "line 2"), ("{{ a b }}", "line 1: expected 'end_var'"),
    ("{% for x in [1] %}", "never closed"), ("{# open", "missing end of comment"), ("{{ 'x' ", "inside a tag"),
    ("{% endif %}", "unknown tag 'endif'"),
])
def test_syntax_errors_name_the_line(snippet, message):
    with pytest.raises(ChatTemplateSyntaxError, match=message):
        ChatTemplate(snippet)
    check_same(snippet, [U1], **SPECIAL)  # jinja2 refuses it too


# -- Tokenizer.apply_chat_template and {"messages"} data -------------------------------------------

# family -> (bos_token, eos_token, the special token closing an assistant turn)
TOKENS = {
    "smollm2": (None, "<|im_end|>", "<|im_end|>"), "smollm3": (None, "<|im_end|>", "<|im_end|>"),
    "qwen2_5": (None, "<|im_end|>", "<|im_end|>"), "qwen3": (None, "<|im_end|>", "<|im_end|>"),
    "llama3_1": ("<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "llama3_2": ("<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "gemma2": ("<bos>", "<eos>", "<end_of_turn>"), "gemma3": ("<bos>", "<eos>", "<end_of_turn>"),
    "phi3_5": ("<s>", "<|endoftext|>", "<|end|>"), "phi4_mini": (None, "<|endoftext|>", "<|end|>"),
    "mistral_nemo": ("<s>", "</s>", "</s>"), "olmo2": ("<|endoftext|>", "<|endoftext|>", "<|endoftext|>"),
    "granite3_3": (None, "<|end_of_text|>", "<|end_of_text|>"),
}
SPECIAL_TOKENS = sorted({t for family in TOKENS.values() for t in family if t} | {
    "<|im_start|>", "<|start_header_id|>", "<|end_header_id|>", "<start_of_turn>", "<|system|>", "<|user|>",
    "<|assistant|>", "[INST]", "[/INST]", "<|start_of_role|>", "<|end_of_role|>"})


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> a folder with a small trained byte-level BPE carrying the family's template and tokens."""
    tokenizers = crosscheck("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIAL_TOKENS)
    tok.train_from_iterator([template(f) for f in FAMILIES] * 2, trainer)
    out = {}
    for family, (bos, eos, _) in TOKENS.items():
        folder = tmp_path_factory.mktemp(family)
        tok.save(str(folder / "tokenizer.json"))
        config = {"chat_template": template(family), "eos_token": eos, "bos_token": bos,
                  "tokenizer_class": "PreTrainedTokenizerFast"}
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        out[family] = folder
    return out


@pytest.mark.parametrize("family", sorted(TOKENS))
def test_tokenizer_apply_chat_template_matches_transformers(folders, family):
    transformers = crosscheck("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(folders[family]))
    tok = load_tokenizer(folders[family])
    for name in ("system_user", "multi_turn", "ends_with_assistant", "reasoning", "odd_contents"):
        messages = CONVERSATIONS[name]
        for generation_prompt in (False, True):
            for kwargs in ({}, {"enable_thinking": False}):
                try:
                    text = hf.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False,
                                                  **kwargs)
                except Exception as e:  # the template's own raise_exception
                    with pytest.raises(ValueError, match=re.escape(str(e))):
                        tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, **kwargs)
                    continue
                ids = hf.apply_chat_template(messages, add_generation_prompt=generation_prompt, **kwargs)
                ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
                assert tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False,
                                               **kwargs) == text
                assert tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, **kwargs) == ids


def test_tokenizer_apply_chat_template_options(folders):
    transformers = crosscheck("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(folders["smollm2"]))
    tok = load_tokenizer(folders["smollm2"])
    other = template("olmo2")
    assert tok.apply_chat_template([U1, A1], chat_template=other, tokenize=False, return_dict=False) == \
        hf.apply_chat_template([U1, A1], chat_template=other, tokenize=False)
    with pytest.raises(NotImplementedError, match="option continue_final_message"):
        tok.apply_chat_template([U1, A1], continue_final_message=True)
    with pytest.raises(ValueError, match="empty conversation"):
        tok.apply_chat_template([])


def labelled_runs(tok, example):
    keep = np.flatnonzero(example.labels != IGNORE_INDEX)
    runs = np.split(keep, np.flatnonzero(np.diff(keep) != 1) + 1) if len(keep) else []
    return [tok.decode(example.input_ids[run].tolist()) for run in runs]


# What each family's template makes of an assistant turn (content, then its closing marker) in the
# middle of a conversation and at its end (Phi's templates close a conversation with eos_token).
TURN = {
    "phi3_5": ("{}<|end|>", "{}<|end|>\n<|endoftext|>"), "phi4_mini": ("{}<|end|>", "{}<|end|><|endoftext|>"),
}


@pytest.mark.parametrize("family", sorted(TOKENS))
def test_messages_rows_label_assistant_turns_only(folders, family, tmp_path):
    tok = load_tokenizer(folders[family])
    messages = [U1, A1, {"role": "user", "content": "And 2+2?"}, {"role": "assistant", "content": "It is 4."}]
    if family == "qwen3":  # the last turn keeps an empty reasoning block, earlier turns lose it
        expected = [A1["content"] + "<|im_end|>", "<think>\n\n</think>\n\nIt is 4.<|im_end|>"]
    else:
        middle, end = TURN.get(family, ("{}" + TOKENS[family][2],) * 2)
        expected = [middle.format(A1["content"]), end.format("It is 4.")]
    (example,) = load_examples(write_rows(tmp_path, [{"messages": messages}]), tok, 2048)
    assert example.input_ids[:len(example.input_ids)].tolist()[:len(tok.apply_chat_template(messages))] == \
        tok.apply_chat_template(messages)
    assert labelled_runs(tok, example) == expected


def test_qwen3_messages_rows_label_a_turn_whose_reasoning_the_template_drops(folders, tmp_path):
    """Qwen3's template renders an assistant turn followed by a user turn without its reasoning block; the turn is
    then located in the whole rendering (its answer and <|im_end|>), and the last turn keeps its reasoning."""
    tok = load_tokenizer(folders["qwen3"])
    messages = [U1, A2_THINK, U2, A2_THINK]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text.count("Add them.") == 1  # the first turn's reasoning is not rendered
    (example,) = load_examples(write_rows(tmp_path, [{"messages": messages}]), tok, 2048)
    assert labelled_runs(tok, example) == ["4<|im_end|>", "<think>\nAdd them.\n</think>\n\n4<|im_end|>"]


def test_messages_rows_refuse_a_turn_rendered_as_something_else(folders, tmp_path):
    """A template that renders an earlier assistant turn as other text than its content (here: a summary line)
    cannot have the turn located: the row is refused by name, rather than labelled wrongly."""
    tok = load_tokenizer(folders["qwen3"])
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and not loop.last %}"
                         "(earlier answer){% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ValueError, match=r"rows\.jsonl:1: messages\[1\]: the chat template renders this assistant "
                                         "turn differently"):
        load_examples(write_rows(tmp_path, [{"messages": [U1, A1, U2, A1]}]), tok, 2048)


@pytest.mark.parametrize("family", sorted(TOKENS))
def test_end_of_turn_id(folders, family):
    """The token `lora-np generate --chat` also stops on (Gemma's <end_of_turn> is not its eos)."""
    tok = load_tokenizer(folders[family])
    assert end_of_turn_id(tok) == tok.token_to_id(TOKENS[family][2])


def test_messages_rows_the_template_refuses_name_the_row(folders, tmp_path):
    tok = load_tokenizer(folders["gemma2"])
    path = write_rows(tmp_path, [{"messages": [U1, A1]}, {"messages": [SYSTEM, U1, A1]}])
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: the chat template refuses this conversation: "
                                         "System role not supported"):
        load_examples(path, tok, 64)


def write_rows(folder, rows):
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# -- whitespace control, generated ------------------------------------------------------------------

def _tag(draw, body, kind="%"):
    left, right = draw(st.sampled_from(["", "-", "+"])), draw(st.sampled_from(["", "-", "+"]))
    if kind == "{":
        left, right = left.replace("+", ""), right.replace("+", "")  # no + on variable tags
        return "{{" + left + " " + body + " " + right + "}}"
    return "{" + kind + left + " " + body + " " + right + kind + "}"


@st.composite
def whitespace_templates(draw, depth=0):
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        choice = draw(st.sampled_from(["text", "var", "comment", "if", "for"] if depth < 2 else ["text", "var"]))
        if choice == "text":
            parts.append(draw(st.text(st.sampled_from(" \t\na\r"), max_size=6)))
        elif choice == "var":
            parts.append(_tag(draw, "'v'", "{"))
        elif choice == "comment":
            parts.append(_tag(draw, "c", "#"))
        else:
            head = "if true" if choice == "if" else "for i in [1, 2]"
            parts += [_tag(draw, head), draw(whitespace_templates(depth + 1)), _tag(draw, "end" + choice)]
    return "".join(parts)


@settings(max_examples=300)
@given(source=whitespace_templates())
def test_whitespace_control_matches_jinja2(source):
    check_same(source, [U1], **SPECIAL)


# -- expressions, generated -----------------------------------------------------------------------

ATOMS = ["1", "2", "0", "-1", "2.5", "'a'", "'ab c'", "''", "none", "true", "false", "[1, 2]", "[]", "{'k': 1}",
         "u", "messages", "messages[0]", "messages[0].role", "ns.x", "(1, 2)", "'x'[0]", "[3, 1, 2][::-1]", "'abc'[1:]"]
OPERATORS = ["+", "-", "*", "/", "//", "%", "**", "~", "==", "!=", "<", "<=", ">", ">=", "in", "not in", "and", "or"]
FILTER_CALLS = ["|length", "|string", "|trim", "|tojson", "|list", "|first", "|last", "|default('d')", "|join(',')",
                "|upper", "|int", "|float", "|abs", "|items|list", "|select|list", "|map('string')|list"]
TEST_CALLS = [" is defined", " is none", " is string", " is number", " is iterable", " is mapping", " is sequence",
              " is not none", " is sameas true", " is true", " is even", " is in [1, 'a']"]


def expressions(depth=3):
    if depth == 0:
        return st.sampled_from(ATOMS)
    sub = expressions(depth - 1)
    return st.one_of(
        st.sampled_from(ATOMS),
        st.builds("{} {} {}".format, sub, st.sampled_from(OPERATORS), sub),
        st.builds("{}{}".format, sub, st.sampled_from(FILTER_CALLS + TEST_CALLS)),
        st.builds("not {}".format, sub), st.builds("({})".format, sub), st.builds("-{}".format, sub),
        st.builds("{} if {} else {}".format, sub, sub, sub), st.builds("{} if {}".format, sub, sub))


def outcome(render):
    try:
        return render()
    except Exception as e:  # any error: both must fail, whatever the wording
        return ("error", type(e).__name__)


@pytest.mark.parametrize("expression", ["-2 ** (u|length)", "(1 if '' else -1) ** (u|length)", "-2 ** 2",
                                        "(1 - 3) ** (u|length)", "-(u|length) ** 2", "ns.x ** (u|length)",
                                        "-2.5 ** (u|length)", "2 ** (u|length)"])
def test_a_negative_constant_base_of_power_as_jinja2_compiles_it(expression):
    """jinja2 folds a constant base to a Python literal and writes `(-2 ** x)`, which Python reads as
    -(2 ** x) when the exponent is not constant; a constant power, or a variable base, is the plain power."""
    source = "{% set ns = namespace(x=-3) %}{{ " + expression + " }}"
    want = outcome(lambda: reference(source, [U1, A1], **SPECIAL))
    assert want[0] == "ok" and outcome(lambda: ours(source, [U1, A1], **SPECIAL)) == want, (source, want)


@settings(max_examples=300)
@given(expression=expressions())
def test_expressions_match_jinja2(expression):
    """Precedence, operators, filters, tests and Undefined on generated expressions."""
    # jinja2 reads `not` after an operator (`1 + not x`) or a test name followed by a word as a
    # variable or an argument named so; no template writes that
    assume(not re.search(r"(?:[-+*/%~<>=(|]|\bin) *not |is (?:not )?\w+ (?:if|not|in|is)|\] (?:if|not|in|is) ",
                         expression))
    source = "{% set ns = namespace(x=3) %}{{ " + expression + " }}"
    want = outcome(lambda: reference(source, [U1, A1], **SPECIAL))
    got = outcome(lambda: ours(source, [U1, A1], **SPECIAL))
    assert got == want or want[0] == got[0] == "error", (source, want, got)


# -- statements, generated ------------------------------------------------------------------------

VALUES = ["1", "x", "y", "i", "loop.index", "x ~ 'a'", "ns.n", "messages|length", "[1, 2]", "bos_token"]


@st.composite
def statements(draw, depth=0):
    out = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["print", "set", "text"] + (["nsset", "if", "for", "generation"] if depth < 3
                                                                else [])))
        if kind == "print":
            out.append("{{ " + draw(st.sampled_from(VALUES)) + " }}")
        elif kind == "set":
            out.append(f"{{% set {draw(st.sampled_from(['x', 'y', 'i', 'messages', 'bos_token']))} = "
                       f"{draw(st.sampled_from(VALUES))} %}}")
        elif kind == "nsset":
            out.append("{% set ns.n = " + draw(st.sampled_from(VALUES)) + " %}")
        elif kind == "text":
            out.append(draw(st.sampled_from(["|", "\n", " "])))
        elif kind == "generation":
            out.append("{% generation %}" + draw(statements(depth + 1)) + "{% endgeneration %}")
        elif kind == "if":
            out.append("{% if " + draw(st.sampled_from(VALUES)) + " %}" + draw(statements(depth + 1))
                       + ("{% else %}" + draw(statements(depth + 1)) if draw(st.booleans()) else "") + "{% endif %}")
        else:
            head = (f"{{% for {draw(st.sampled_from(['i', 'x', 'i, x']))} in "
                    f"{draw(st.sampled_from(['[1, 2]', '[]', 'messages', '[[1, 2], [3, 4]]', 'range(3)']))}"
                    f"{draw(st.sampled_from(['', ' if i', ' if loop is undefined']))} %}}")
            control = draw(st.sampled_from(["", "{% break %}", "{% continue %}", "{% if i == 2 %}{% break %}{% endif %}"]))
            otherwise = "{% else %}" + draw(statements(depth + 1)) if draw(st.booleans()) else ""
            out.append(head + draw(statements(depth + 1)) + control + otherwise + "{% endfor %}")
    return "".join(out)


@settings(max_examples=300)
@given(body=statements())
def test_statements_match_jinja2(body):
    """Scoping of set in loops (and jinja2's compile-time rule: a name a frame first sets is undefined
    in the loops run before that set, even if the context has it), loop else / break / continue,
    namespaces, tuple targets, loop.*."""
    source = "{% set ns = namespace(n=0) %}" + body + "{{ x }}{{ y }}{{ ns.n }}{{ i }}"
    want = outcome(lambda: reference(source, [U1, A1], **SPECIAL))
    got = outcome(lambda: ours(source, [U1, A1], **SPECIAL))
    assert got == want or want[0] == got[0] == "error", (source, want, got)
