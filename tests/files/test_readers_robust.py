"""Hostile files: tiny files that promise giant models, nonsense config values, GGUF layouts llama.cpp refuses,
malformed tokenizers and data lines. Each gives the library's own error naming the file and the key, tensor
or id, and nothing large is allocated before the error (tracemalloc, which sees NumPy's buffers)."""
import functools
import json
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, strategies as st

from lora_np import data as lora_data
from lora_np.gguf import GGUFError, GGUFFile
from lora_np.loaders import GGUF_TENSOR_NAMES, load_model
from lora_np.models import LlamaConfig, LlamaForCausalLM
from lora_np.safetensors import SafetensorsError, load, save_file
from lora_np.tokenizer import Tokenizer, TokenizerError, bytes_to_unicode, load_tokenizer
from conftest import crosscheck

PEAK_LIMIT = 4 << 20  # the tiny models below take a few tens of KiB


def peak_bytes(fn):
    """(result or raised exception, peak traced bytes) of fn()."""
    tracemalloc.start()
    try:
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - the caller checks which
            out = e
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------- a tiny llama, as GGUF and as an HF folder

TINY = dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32)
GGUF_KEYS = {"block_count": 2, "embedding_length": 16, "feed_forward_length": 24, "attention.head_count": 4,
             "attention.head_count_kv": 2, "context_length": 32, "vocab_size": 50}


@functools.lru_cache(maxsize=None)
def _tiny_state():
    return tuple((n, a.astype(np.float32)) for n, a in LlamaForCausalLM(LlamaConfig(**TINY)).state_dict().items())


def tiny_state():
    return dict(_tiny_state())


def write_tiny_gguf(path, **metadata):
    """The tiny llama as a GGUF; `metadata` overrides llama.* keys (a list value becomes an array)."""
    gguf = crosscheck("gguf")
    to_gguf = {v: k for k, v in GGUF_TENSOR_NAMES.items()}
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in {**GGUF_KEYS, **metadata}.items():
        if isinstance(value, list):
            w.add_array(f"llama.{key}", value)
        else:
            w.add_uint32(f"llama.{key}", value)
    for name, a in tiny_state().items():
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{to_gguf[rest]}"
        else:
            gname = to_gguf[name]
        w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tiny_folder(folder, **config):
    save_file(tiny_state(), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **TINY, **config}))
    return folder


def test_the_tiny_files_load(tmp_path):
    crosscheck("gguf")
    ref = tiny_state()
    for path in (write_tiny_gguf(tmp_path / "t.gguf"), write_tiny_folder(tmp_path)):
        model = load_model(path)
        assert model.state_dict()["model.norm.weight"].shape == (16,)
        if path.is_dir():  # GGUF files hold q/k permuted; no permutation was written here
            assert all(np.array_equal(model.state_dict()[n], a) for n, a in ref.items())


@pytest.mark.parametrize("key, value, named", [
    ("block_count", 10**9, "llama.block_count"),
    ("block_count", 3, "llama.block_count"),
    ("block_count", 1, "llama.block_count"),
    ("block_count", 0, "llama.block_count"),
    ("embedding_length", 10**9, "llama.embedding_length"),
    ("embedding_length", 2**24, "model.embed_tokens.weight"),
    ("feed_forward_length", 2**24, "mlp"),
    ("vocab_size", 2**24, "model.embed_tokens.weight"),
    ("attention.head_count", 0, "llama.attention.head_count"),
    ("attention.head_count", 3, "llama.attention.head_count"),
    ("attention.head_count_kv", 0, "llama.attention.head_count_kv"),
    ("attention.head_count_kv", 3, "llama.attention.head_count_kv"),
    ("attention.head_count", [4, 4], "llama.attention.head_count"),
    ("context_length", 0, "llama.context_length"),
])
def test_gguf_metadata_disagreeing_with_the_tensors_is_named_before_allocating(tmp_path, key, value, named):
    path = write_tiny_gguf(tmp_path / "t.gguf", **{key: value})
    err, peak = peak_bytes(lambda: load_model(path))
    assert isinstance(err, ValueError), err
    assert str(path) in str(err) and named in str(err), str(err)
    assert peak < PEAK_LIMIT, f"{peak} bytes allocated before the error"


@pytest.mark.parametrize("key, value", [("rope.dimension_count", 2), ("attention.value_length", 8),
                                        ("expert_count", 8), ("attention.sliding_window", 16)])
def test_gguf_keys_asking_for_another_computation_are_refused(tmp_path, key, value):
    path = write_tiny_gguf(tmp_path / "t.gguf", **{key: value})
    with pytest.raises(NotImplementedError, match=rf"t\.gguf: llama\.{key} = {value} is not supported"):
        load_model(path)
    load_model(write_tiny_gguf(tmp_path / "ok.gguf", **({key: 4} if "dimension" in key or "value" in key else {})))


@given(key=st.sampled_from(sorted(GGUF_KEYS)),
       value=st.one_of(st.sampled_from([0, 1, 2, 3, 4, 8, 10**9, 2**32 - 1]), st.integers(0, 2**32 - 1)))
def test_any_gguf_size_value_loads_or_is_refused_cheaply(tmp_path_factory, key, value):
    path = write_tiny_gguf(tmp_path_factory.mktemp("g") / "t.gguf", **{key: value})
    out, peak = peak_bytes(lambda: load_model(path))
    assert peak < PEAK_LIMIT, f"{peak} bytes for llama.{key} = {value}"
    if isinstance(out, Exception):
        assert isinstance(out, ValueError) and str(path) in str(out), repr(out)
    else:  # what it says is what runs
        c = out.config
        assert (c.num_hidden_layers, c.hidden_size, c.vocab_size) == (2, 16, 50)
        assert c.max_position_embeddings == (value if key == "context_length" else 32)


CONFIG_VALUES = st.one_of(st.sampled_from([0, 1, 2, 4, 16, 24, 50, 10**9, 2**24, 2**62, -1, 2.5, "16", None, True,
                                           [16], {"a": 1}]), st.integers(-2**70, 2**70))


@given(field=st.sampled_from(["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                              "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                              "rms_norm_eps", "rope_theta", "tie_word_embeddings", "hidden_act"]),
       value=CONFIG_VALUES)
def test_any_config_json_value_loads_or_is_refused_cheaply(tmp_path_factory, field, value):
    folder = write_tiny_folder(tmp_path_factory.mktemp("hf"), **{field: value})
    out, peak = peak_bytes(lambda: load_model(folder))
    assert peak < PEAK_LIMIT, f"{peak} bytes for {field} = {value!r}"
    if isinstance(out, Exception):
        assert isinstance(out, (ValueError, NotImplementedError)), repr(out)
        assert str(folder) in str(out), str(out)
        assert field in str(out) or "model.safetensors: tensor" in str(out) or "layers" in str(out), str(out)
    elif value is None:  # these two default to what the others imply
        assert field in ("num_key_value_heads", "head_dim")
    else:  # what it says is what runs
        assert getattr(out.config, field) == (float(value) if field in ("rms_norm_eps", "rope_theta") else value)


def test_giant_config_numbers_are_refused_naming_the_key(tmp_path):
    for field, value in [("num_hidden_layers", 10**9), ("hidden_size", 10**9), ("vocab_size", 10**9),
                         ("intermediate_size", 10**9), ("num_attention_heads", 10**9), ("num_hidden_layers", 5000)]:
        folder = write_tiny_folder(tmp_path, **{field: value})
        err, peak = peak_bytes(lambda: load_model(folder))
        assert isinstance(err, ValueError) and "config.json" in str(err) and field in str(err), repr(err)
        assert peak < PEAK_LIMIT


@pytest.mark.parametrize("text, problem", [
    ("[1, 2]", "expected a JSON object \\(a config\\), got a JSON list"),
    ("{", "not valid JSON"),
    ("[" * 100000 + "]" * 100000, "not valid JSON"),
    ('{"model_type": "llama", "rope_parameters": 5}', "rope_parameters"),
])
def test_config_json_of_the_wrong_shape_is_named(tmp_path, text, problem):
    write_tiny_folder(tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=problem) as e:
        load_model(tmp_path)
    assert "config.json" in str(e.value)


def test_a_broken_shard_index_is_named(tmp_path):
    write_tiny_folder(tmp_path)
    for text in ('{"weight_map": ["model.safetensors"]}', '{"weight_map": {"a": "../x.safetensors"}}', "7"):
        (tmp_path / "model.safetensors.index.json").write_text(text)
        with pytest.raises(ValueError, match="model.safetensors.index.json"):
            load_model(tmp_path)


# ---------------------------------------------------------------- GGUF layout, as llama.cpp's gguf.cpp checks it

def _gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def hand_gguf(tensors, data_size, alignment=32):
    """GGUF bytes with tensor infos (name, GGUF-order dims, ggml type id, offset) and data_size zero bytes."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 1)
    out += _gguf_string("general.alignment") + struct.pack("<II", 4, alignment)
    for name, dims, type_id, offset in tensors:
        out += _gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, type_id, offset)
    out += b"\0" * (-len(out) % alignment)
    return out + b"\0" * data_size


@given(sizes=st.lists(st.integers(1, 20), min_size=1, max_size=4), alignment=st.sampled_from([8, 32, 64]),
       shifts=st.lists(st.sampled_from([0, 0, 0, -4, 4, -1, 1, 32, -32]), min_size=4, max_size=4))
def test_tensor_offsets_are_accepted_exactly_when_llama_cpp_accepts_them(tmp_path_factory, sizes, alignment, shifts):
    """llama.cpp: tensor i must start at the sum of the earlier tensors' sizes, each padded to the alignment."""
    layout, pos = [], 0
    for n in sizes:
        layout.append(pos)
        pos += -(-4 * n // alignment) * alignment
    offsets = [max(0, o + s) for o, s in zip(layout, shifts)]
    tensors = [(f"t{i}", [n], 0, off) for i, (n, off) in enumerate(zip(sizes, offsets))]
    path = tmp_path_factory.mktemp("layout") / "t.gguf"
    path.write_bytes(hand_gguf(tensors, max(o + 4 * n for o, n in zip(offsets, sizes)) + 64, alignment))
    if offsets == layout:
        f = GGUFFile(path)
        assert [f.tensors[f"t{i}"].offset - f.data_offset for i in range(len(sizes))] == layout
    else:
        bad = next(i for i, (o, e) in enumerate(zip(offsets, layout)) if o != e)
        with pytest.raises(GGUFError, match=rf"tensor 't{bad}' has offset {offsets[bad]}, expected {layout[bad]}"):
            GGUFFile(path)


def test_overlapping_and_misaligned_tensors_are_refused(tmp_path):
    path = tmp_path / "t.gguf"
    for offsets, problem in [((0, 0), "'b' has offset 0, expected 32"), ((0, 16), "'b' has offset 16, expected 32"),
                             ((4, 36), "'a' has offset 4, expected 0")]:
        path.write_bytes(hand_gguf([("a", [8], 0, offsets[0]), ("b", [8], 0, offsets[1])], 128))
        with pytest.raises(GGUFError, match=problem) as e:
            GGUFFile(path)
        assert str(path) in str(e.value)


def test_a_zero_dim_tensor_is_one_element(tmp_path):
    path = tmp_path / "t.gguf"
    path.write_bytes(hand_gguf([("s", [], 0, 0)], 4))
    assert GGUFFile(path).load("s").shape == ()
    path.write_bytes(hand_gguf([("q", [], 2, 0)], 18))  # Q4_0: 32 values a block, and 1 is not a multiple
    with pytest.raises(GGUFError, match=r"tensor 'q': row length 1 is not a multiple of the Q4_0 block size 32"):
        GGUFFile(path)


# ---------------------------------------------------------------- safetensors

def _safetensors(shape):
    header = json.dumps({"x": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + b"\0" * 4


def test_safetensors_with_more_dims_than_numpy_is_named():
    assert load(_safetensors([1] * 64))["x"].shape == (1,) * 64
    with pytest.raises(SafetensorsError, match="tensor 'x' has 65 dimensions"):
        load(_safetensors([1] * 65))


# ---------------------------------------------------------------- tokenizers

ALPHABET = list(bytes_to_unicode().values())


def tokenizer_json(**changes):
    vocab = {c: i for i, c in enumerate(ALPHABET)}
    vocab["ab"] = 256
    data = {"version": "1.0", "normalizer": None, "post_processor": None,
            "added_tokens": [{"id": 257, "content": "<|end|>", "special": True, "normalized": False}],
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
            "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "vocab": vocab, "merges": ["a b"]}}
    for key, value in changes.items():
        node, *path = key.split(".")
        target = data
        for part in [node, *path][:-1]:
            target = target[part]
        target[[node, *path][-1]] = value
    return data


def _write(tmp_path, data):
    path = tmp_path / "tokenizer.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_the_tiny_tokenizer_works(tmp_path):
    tok = load_tokenizer(_write(tmp_path, tokenizer_json()))
    assert tok.encode("ab a<|end|>") == [256, ALPHABET.index("Ġ"), ord("a") - 33, 257]
    assert tok.decode(tok.encode("ab a<|end|>")) == "ab a<|end|>"


@pytest.mark.parametrize("data, problem", [
    ("[1, 2, 3]", "expected a JSON object, got a JSON list"),
    ("[" * 100000, "not valid JSON"),
    (tokenizer_json(model=[1]), "'model' must be an object"),
    (tokenizer_json(**{"model.vocab": [["a", 0]]}), "model.vocab must be an object"),
    (tokenizer_json(**{"model.vocab.ab": -1}), r"model.vocab\['ab'\] = -1 is not an id"),
    (tokenizer_json(**{"model.vocab.ab": 2**40}), r"model.vocab\['ab'\] = 1099511627776 is not an id"),
    (tokenizer_json(**{"model.vocab.ab": 256.0}), r"model.vocab\['ab'\] = 256.0 is not an id"),
    (tokenizer_json(**{"model.vocab.ab": True}), r"model.vocab\['ab'\] = True is not an id"),
    (tokenizer_json(**{"model.vocab.ab": 3}), "id 3 is given to both"),
    (tokenizer_json(**{"model.merges": ["a b", 7]}), r"model.merges\[1\] = 7 is not a pair"),
    (tokenizer_json(**{"model.merges": ["a b c"]}), r"model.merges\[0\] = \('a', 'b', 'c'\) is not a pair"),
    (tokenizer_json(added_tokens=[{"id": 257, "content": ""}]), "added token id 257: content '' must be a non-empty"),
    (tokenizer_json(added_tokens=[{"id": "257", "content": "x"}]), r"added_tokens\[0\]: id '257' is not an id"),
    (tokenizer_json(added_tokens=[{"id": -3, "content": "x"}]), r"added_tokens\[0\]: id -3 is not an id"),
    (tokenizer_json(added_tokens=[{"id": 5, "content": "<x>"}]), "added token id 5 .'<x>'. is also the id of"),
    (tokenizer_json(added_tokens=[{"id": 300, "content": "ab"}]), "added token 'ab' has id 300, but model.vocab"),
    (tokenizer_json(added_tokens=[{"content": "x"}]), r"added_tokens\[0\] must be an object with 'id'"),
    (tokenizer_json(added_tokens={"id": 1}), "'added_tokens' must be a JSON list"),
    (tokenizer_json(pre_tokenizer={"type": "Sequence"}), "pre_tokenizer is malformed"),
    (tokenizer_json(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}), "invalid regex"),
    (tokenizer_json(post_processor={"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>"}}]}),
     "post_processor is malformed"),
    (tokenizer_json(post_processor={"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>"}}],
                                    "special_tokens": {"<s>": {"ids": [-1]}}}), "post_processor ids"),
])
def test_malformed_tokenizer_json_is_named(tmp_path, data, problem):
    path = _write(tmp_path, data)
    with pytest.raises(TokenizerError, match=problem) as e:
        load_tokenizer(path)
    assert str(path) in str(e.value)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(_write(tmp_path_factory.mktemp("tok"), tokenizer_json()))


ID_ITEMS = st.one_of(st.integers(0, 257), st.integers(-3, 400), st.integers(0, 257).map(np.int64),
                     st.integers(0, 257).map(np.int32), st.floats(0, 257), st.booleans(), st.text(max_size=2),
                     st.just(np.bool_(True)), st.just(None))


@given(ids=st.lists(ID_ITEMS, max_size=6))
def test_decode_takes_integer_ids_of_the_vocabulary_only(tok, ids):
    def expected():
        for k, i in enumerate(ids):
            if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
                return TypeError, rf"ids\[{k}\] = "
            if not 0 <= i <= 257:
                return TokenizerError, f"id {i} is not in the vocabulary"
        return None, None

    error, message = expected()
    if error is None:
        text = tok.decode(ids)
        assert text == tok.decode(np.array(ids, dtype=np.int64)) == tok.decode([int(i) for i in ids])
    else:
        with pytest.raises(error, match=message):
            tok.decode(ids)


def test_gguf_tokenizer_metadata_of_the_wrong_type_is_named(tmp_path):
    gguf = crosscheck("gguf")
    for key, value, problem in [("tokenizer.ggml.tokens", [1, 2], "tokenizer.ggml.tokens must be an array of str"),
                                ("tokenizer.ggml.bos_token_id", "x", "tokenizer.ggml.bos_token_id = 'x'")]:
        path = tmp_path / "t.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_string("tokenizer.ggml.model", "gpt2")
        w.add_string("tokenizer.ggml.pre", "gpt-2")
        if key != "tokenizer.ggml.tokens":
            w.add_array("tokenizer.ggml.tokens", ALPHABET)
        w.add_array("tokenizer.ggml.merges", ["a b"])
        if isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_string(key, value)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(TokenizerError, match=problem):
            load_tokenizer(path)


# ---------------------------------------------------------------- data files

def test_a_deeply_nested_jsonl_line_names_file_and_line(tmp_path, tok):
    tokenizer = Tokenizer({c: i for i, c in enumerate(ALPHABET)} | {"<|end|>": 256}, [], [],
                          {"type": "ByteLevel", "add_prefix_space": False}, eos_token="<|end|>")
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ab"}\n' + "[" * 100000 + "]" * 100000 + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: JSON nested too deeply"):
        lora_data.load_examples(path, tokenizer, seq_len=8)
