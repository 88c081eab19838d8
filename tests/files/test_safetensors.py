"""lora_np.safetensors: round trips, byte-identity with the reference writer, hostile input."""
import json
import os
import resource
import signal
import struct

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import crosscheck
from lora_np import safetensors as sft
from lora_np.safetensors import SafetensorsError

DTYPES = [np.bool_, np.uint8, np.int8, np.int16, np.uint16, np.float16, np.int32,
          np.uint32, np.float32, np.complex64, np.float64, np.int64, np.uint64]
NAMES = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12)


def bits(a):
    """The bytes of an array, so NaNs and odd bool bytes compare exactly."""
    return np.asarray(a, order="C").tobytes()


@st.composite
def arrays(draw, dtypes=DTYPES):
    """Arrays of any listed dtype, sometimes big-endian or non-contiguous."""
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    if dtype.itemsize > 1 and draw(st.booleans()):
        dtype = dtype.newbyteorder(">")
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    a = draw(hnp.arrays(dtype, shape))
    view = draw(st.sampled_from(["c", "T", "step"]))
    if view == "T":
        a = a.T
    elif view == "step" and a.ndim:
        a = a[::2]
    return a


tensor_dicts = st.dictionaries(NAMES.filter(lambda s: s != "__metadata__"), arrays(), max_size=5)
metadatas = st.none() | st.dictionaries(NAMES, st.text(max_size=10), max_size=1)


@given(tensor_dicts, metadatas)
def test_round_trip_through_a_file(tmp_path_factory, tensors, metadata):
    path = tmp_path_factory.mktemp("rt") / "t.safetensors"
    sft.save_file(tensors, path, metadata=metadata)
    loaded = sft.load_file(path)
    copies = sft.load_file(path, mmap=False)
    assert loaded.keys() == tensors.keys() == copies.keys()
    for name, a in tensors.items():
        for b in (loaded[name], copies[name]):
            assert b.shape == a.shape and b.dtype == a.dtype.newbyteorder("<"), name
            assert bits(b) == bits(a.astype(b.dtype)), name
        assert not loaded[name].flags.writeable and copies[name].flags.writeable
    assert sft.load_metadata(path) == (metadata or {})


@given(tensor_dicts, metadatas)
def test_bytes_identical_to_reference_writer(tmp_path_factory, tensors, metadata):
    safetensors_numpy = crosscheck("safetensors.numpy")
    # With no tensors and metadata={} the reference writes invalid JSON, '{},"__metadata__":{}}'
    # (it sizes the JSON map by the number of metadata keys); ours writes '{"__metadata__":{}}'.
    assume(tensors or metadata != {})
    # The reference wants C-contiguous arrays; ours must write the same bytes from any layout.
    contiguous = {k: np.asarray(v, order="C") for k, v in tensors.items()}
    folder = tmp_path_factory.mktemp("ref")
    sft.save_file(tensors, folder / "ours.safetensors", metadata=metadata)
    safetensors_numpy.save_file(contiguous, folder / "ref.safetensors", metadata=metadata)
    assert (folder / "ours.safetensors").read_bytes() == (folder / "ref.safetensors").read_bytes()
    assert sft.save(tensors, metadata=metadata) == safetensors_numpy.save(contiguous, metadata=metadata)


@given(tensor_dicts, st.dictionaries(NAMES, st.text(max_size=10), min_size=2, max_size=4))
def test_header_matches_reference_with_several_metadata_keys(tensors, metadata):
    """The reference writes `__metadata__` in hash order, so only the parsed headers can agree."""
    safetensors_numpy = crosscheck("safetensors.numpy")
    ours = sft.save(tensors, metadata=metadata)
    ref = safetensors_numpy.save({k: np.asarray(v, order="C") for k, v in tensors.items()},
                                 metadata=metadata)
    assert len(ours) == len(ref) and ours[:8] == ref[:8]
    n = struct.unpack("<Q", ours[:8])[0]
    assert json.loads(ours[8:8 + n]) == json.loads(ref[8:8 + n])
    assert ours[8 + n:] == ref[8 + n:]


@given(tensor_dicts, metadatas)
def test_reads_files_the_reference_writes(tmp_path_factory, tensors, metadata):
    safetensors_numpy = crosscheck("safetensors.numpy")
    assume(tensors or metadata != {})  # the reference's invalid output, see above
    path = tmp_path_factory.mktemp("read") / "ref.safetensors"
    safetensors_numpy.save_file({k: np.asarray(v, order="C") for k, v in tensors.items()}, path,
                                metadata=metadata)
    ours, ref = sft.load_file(path), safetensors_numpy.load_file(path)
    assert ours.keys() == ref.keys()
    for name in ref:
        assert ours[name].dtype == ref[name].dtype and ours[name].shape == ref[name].shape, name
        assert bits(ours[name]) == bits(ref[name]), name
    assert sft.load_metadata(path) == (metadata or {})


@given(hnp.arrays(np.float32, hnp.array_shapes(max_dims=2, max_side=6)))
def test_bf16_matches_torch(tmp_path_factory, x):
    torch = crosscheck("torch")
    safetensors_torch = crosscheck("safetensors.torch")
    folder = tmp_path_factory.mktemp("bf16")
    sft.save_file({"x": x}, folder / "ours.safetensors", dtype="BF16")
    expected = torch.from_numpy(x).to(torch.bfloat16)
    theirs = safetensors_torch.load_file(folder / "ours.safetensors")["x"]
    assert theirs.dtype == torch.bfloat16
    # Rounding must agree bit for bit; NaN bit patterns differ between torch's own code paths.
    nan = np.isnan(x)
    assert np.isnan(theirs.float().numpy()[nan]).all()
    assert bits(theirs.view(torch.int16).numpy()[~nan]) == bits(expected.view(torch.int16).numpy()[~nan])
    # And the other way: a file torch writes loads as the exact float32 widening.
    safetensors_torch.save_file({"x": expected}, folder / "torch.safetensors")
    loaded = sft.load_file(folder / "torch.safetensors")["x"]
    assert loaded.dtype == np.float32
    assert bits(loaded) == bits(expected.float().numpy())


@given(hnp.arrays(np.float64, hnp.array_shapes(max_dims=2, max_side=6)),
       hnp.arrays(np.int32, 3))
def test_dtype_option_converts_floats_only(x, i):
    loaded = sft.load(sft.save({"x": x, "i": i}, dtype="F16"))
    assert bits(loaded["x"]) == bits(x.astype(np.float16)) and loaded["i"].dtype == np.int32
    assert bits(loaded["i"]) == bits(i)


# ---------------------------------------------------------------- hostile input

def file_bytes(header, data=b"", pad=True):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


F32_PAIR = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}

BAD_FILES = {
    "truncated": (b"\x08\x00\x00", "truncated"),
    "header longer than file": (struct.pack("<Q", 64) + b"{}", "larger than the file"),
    "header over the limit": (struct.pack("<Q", 2**63) + b"{}", "exceeds"),
    "bad json": (file_bytes(b'{"a": '), "not valid JSON"),
    "not utf-8": (file_bytes(b'{"\xff": 1}'), "UTF-8"),
    "not an object": (file_bytes([1, 2]), "expected an object"),
    "duplicate key": (file_bytes(b'{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},'
                                 b'"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'), "duplicate"),
    "unknown dtype": (file_bytes({"a": {"dtype": "F31", "shape": [2], "data_offsets": [0, 8]}},
                                 bytes(8)), "unknown dtype"),
    "missing field": (file_bytes({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)), "entry must be"),
    "negative shape": (file_bytes({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
                                  bytes(8)), "non-negative integers"),
    "float shape": (file_bytes({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}},
                               bytes(8)), "non-negative integers"),
    "bool shape": (file_bytes({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
                              bytes(4)), "non-negative integers"),
    "offsets reversed": (file_bytes({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}},
                                    bytes(8)), "end before"),
    "size mismatch": (file_bytes({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
                                 bytes(8)), "needs 12 bytes"),
    "out of bounds": (file_bytes(F32_PAIR, bytes(4)), "data section has 4"),
    "trailing bytes": (file_bytes(F32_PAIR, bytes(12)), "data section has 12"),
    "gap": (file_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)),
            "leaves a gap"),
    "overlap": (file_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                            "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)),
                "overlaps"),
    "shape overflow": (file_bytes({"a": {"dtype": "F64", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}),
                       "overflows"),
    "huge dim beside a zero": (file_bytes({"a": {"dtype": "U8", "shape": [2**63, 0], "data_offsets": [0, 0]}}),
                               "overflows"),
    "bad metadata": (file_bytes({"__metadata__": {"k": 1}}), "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_raise_an_error_naming_file_and_problem(tmp_path, case):
    data, problem = BAD_FILES[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    for read in (sft.load_file, sft.read_header, sft.load_metadata):
        with pytest.raises(SafetensorsError) as e:
            read(path)
        assert str(path) in str(e.value) and problem in str(e.value), (read.__name__, str(e.value))


def test_unloadable_dtype_is_named(tmp_path):
    path = tmp_path / "f8.safetensors"
    path.write_bytes(file_bytes({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, bytes(2)))
    header, data_start = sft.read_header(path)
    assert header["w"]["dtype"] == "F8_E4M3" and data_start == os.path.getsize(path) - 2
    with pytest.raises(SafetensorsError, match="'w' has dtype F8_E4M3"):
        sft.load_file(path)


def load_or_error(data):
    """Load `data`; the only acceptable failure is SafetensorsError. Returns None on failure."""
    try:
        return sft.load(data)
    except SafetensorsError:
        return None


def agrees_with_reference(data, ours):
    """Where both readers accept a buffer they must return the same tensors."""
    safetensors_numpy = crosscheck("safetensors.numpy")
    try:
        ref = safetensors_numpy.load(data)
    except Exception:  # the reference raises several exception types
        return
    assert ours.keys() == ref.keys()
    for name in ref:
        assert ours[name].shape == ref[name].shape and bits(ours[name]) == bits(ref[name]), name


VALID = sft.save({"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4, dtype=np.int16),
                  "m": np.array([1, 0, 1], dtype=np.uint8)}, metadata={"format": "pt"})


@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, len(VALID)))
def test_mutated_files_load_correctly_or_raise(mutations, keep):
    data = bytearray(VALID)
    for pos, value in mutations:
        data[pos] = value
    data = bytes(data[:keep])
    ours = load_or_error(data)
    if ours is not None:
        agrees_with_reference(data, ours)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=4),
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
                           max_leaves=8)
ENTRIES = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "I8", "BF16", "U64", "F4", "F6_E2M3", "x"]) | JSON_VALUES,
    "shape": st.lists(st.integers(-1, 5) | st.sampled_from([2**31, 2**61, 2**63, 2**64 - 1, 2**64]),
                      max_size=3) | JSON_VALUES,
    "data_offsets": st.lists(st.integers(-1, 40), min_size=2, max_size=2) | JSON_VALUES,
})


@given(st.dictionaries(st.text(max_size=4), ENTRIES | JSON_VALUES, max_size=4), st.binary(max_size=48))
def test_random_headers_load_correctly_or_raise(header, data):
    raw = file_bytes(header, data)
    ours = load_or_error(raw)
    if ours is None:
        return
    # Accepted: every tensor must be exactly its declared slice of the data section.
    n = struct.unpack("<Q", raw[:8])[0]
    for name, a in ours.items():
        begin, end = header[name]["data_offsets"]
        if header[name]["dtype"] == "BF16":
            a = sft.float32_to_bf16(a)  # exact inverse of the widening
        assert bits(a) == raw[8 + n + begin:8 + n + end], name
    agrees_with_reference(raw, ours)


# ---------------------------------------------------------------- atomic writes

OLD = {"old": np.arange(4, dtype=np.float32)}
NEW = {"new": np.ones((64, 64), dtype=np.float64)}


def assert_untouched(folder, path, old_bytes):
    assert path.read_bytes() == old_bytes
    assert sorted(os.listdir(folder)) == [path.name], "a temporary file was left behind"


def test_failed_rename_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    sft.save_file(OLD, path)
    old_bytes = path.read_bytes()

    def fail(*args):
        raise OSError("simulated rename failure")
    monkeypatch.setattr(sft.os, "replace", fail)
    with pytest.raises(OSError, match="simulated"):
        sft.save_file(NEW, path)
    assert_untouched(tmp_path, path, old_bytes)


def test_disk_full_mid_write_leaves_old_file_and_no_temp(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse writes past 1 KiB (EFBIG), as a full disk would."""
    path = tmp_path / "m.safetensors"
    sft.save_file(OLD, path)
    old_bytes = path.read_bytes()
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, old_limit[1]))
        with pytest.raises(OSError):
            sft.save_file(NEW, path)  # 32 KiB of data
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert_untouched(tmp_path, path, old_bytes)


def test_unsavable_tensor_creates_nothing(tmp_path):
    path = tmp_path / "m.safetensors"
    with pytest.raises(SafetensorsError, match="'s'.*no safetensors equivalent"):
        sft.save_file({"ok": np.zeros(2), "s": np.array(["text"])}, path)
    assert os.listdir(tmp_path) == []


def test_file_mode_follows_umask(tmp_path):
    path = tmp_path / "m.safetensors"
    umask = os.umask(0o022)
    try:
        sft.save_file(OLD, path)
    finally:
        os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_iter_file_one_tensor_at_a_time(tmp_path):
    """iter_file yields what load_file holds, tensor by tensor; widen_bf16=False gives a BF16 tensor's bits;
    release=True drops each tensor's pages once the next is asked for, and a view kept from before still
    reads the file's values (the pages come back from the file)."""
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.standard_normal((300 + i, 97)).astype(np.float32) for i in range(5)}
    path = tmp_path / "m.safetensors"
    sft.save_file(tensors, path, dtype="BF16")
    want = sft.load_file(path)
    kept = dict(sft.iter_file(path, release=True))
    assert kept.keys() == want.keys()
    for name, bits in sft.iter_file(path, widen_bf16=False, release=True):
        assert bits.dtype == np.uint16 and np.array_equal(sft.bf16_to_float32(bits), want[name]), name
    sft.save_file(tensors, path)  # float32: views of the map
    views = list(sft.iter_file(path, release=True))
    for name, view in views:
        assert np.array_equal(view, tensors[name]), name
    for name in kept:
        assert np.array_equal(kept[name], want[name]), name
