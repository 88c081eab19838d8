"""GGUF export against its real consumers: the writer and quantizers against gguf-py, LoRA adapter GGUFs and
merged GGUFs against llama.cpp itself (llama-cpp-python) and transformers (gguf_file=), and the `--adapter
a.gguf` round trip.

llama.cpp is run with an F32 KV cache (type_k = type_v = 0): its default F16 cache rounds K and V to half
precision, which would be the comparison's error, not the export's."""
import json
import os

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lora_np
from lora_np import safetensors
from conftest import assert_close, crosscheck, patch_float64
from lora_np import gguf as lg
from lora_np.cli import main as cli_main
from lora_np.export import gguf_config_keys, gguf_row_map, save_merged_gguf, to_gguf_rows
from lora_np.gguf import GGUFError, GGUFFile
from lora_np.loaders import load_model
from lora_np.lora import LoraConfig, LoraModel, get_peft_model
from lora_np.lora.gguf_io import read_gguf_adapter, save_gguf_adapter
from lora_np.models import LlamaConfig, LlamaForCausalLM, family

IDS = [3, 17, 9, 42, 5, 5, 61, 0, 8, 23, 77]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_model(tie=False, seed=0, model_cls=LlamaForCausalLM, config_cls=LlamaConfig, **overrides):
    """A tiny random lora_np Llama (GQA, weights spread enough that every layer matters)."""
    fields = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=2.0**-17, rope_theta=500.0, max_position_embeddings=256,
                  tie_word_embeddings=tie)
    fields.update(overrides)
    lora_np.manual_seed(seed)
    model = model_cls(config_cls(**fields))
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        p.data = (rng.standard_normal(p.shape) * (0.1 if p.data.ndim == 2 else 0.2) + (p.data.ndim == 1)).astype(
            np.float32)
    return model.eval()


def randomize_adapter(lora_model, seed=1, scale=0.2):
    rng = np.random.default_rng(seed)
    for name, p in lora_model.named_parameters():
        if "lora_" in name:
            p.data = (rng.standard_normal(p.shape) * scale).astype(p.data.dtype)
    return lora_model.eval()


def logits(model, ids=IDS):
    return model(np.array([ids])).logits.data[0]


def llama_cpp_logits(model_path, lora_path=None, ids=IDS):
    llama_cpp = crosscheck("llama_cpp")
    llm = llama_cpp.Llama(str(model_path), lora_path=None if lora_path is None else str(lora_path), logits_all=True,
                          n_ctx=256, n_threads=2, verbose=False, type_k=0, type_v=0)
    llm.eval(list(ids))
    return np.array(llm.scores[:len(ids)])


def assert_rel(actual, expected, rtol, name):
    """max |actual - expected| <= rtol * max |expected| (logits: relative to their scale)."""
    assert_close(actual, expected, rtol=0, atol=rtol * float(np.abs(expected).max()), name=name)


@pytest.fixture(scope="module")
def base_gguf(tmp_path_factory):
    """A tiny float32 llama GGUF base written by lora_np (each test loads its own model from it)."""
    path = tmp_path_factory.mktemp("base") / "base.gguf"
    return save_merged_gguf(tiny_model(), path, outtype="f32")


# ---------------------------------------------------------------------------- writer and quantizers
blocks = hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.sampled_from([32, 64])),
                    elements=st.floats(-1e4, 1e4, width=32))


@given(blocks, st.sampled_from(["F16", "Q8_0", "Q4_0", "Q5_0"]), st.integers(0, 3))
def test_quantize_is_bit_exact_with_gguf_py(x, ggml_type, special):
    gguf = crosscheck("gguf")
    x = x.copy()
    if special == 1:
        x[0, :32] = 0  # an all-zero block: d = 0
    elif special == 2:
        x[0, :32] = x[0, 0]  # ties: every element the block's max
    elif special == 3:
        x[0, 5] = -np.abs(x[0, :32]).max() - 1  # a negative extreme sets Q4_0's sign
    ours = lg.quantize(x, ggml_type)
    theirs = gguf.quants.quantize(x, gguf.GGMLQuantizationType[ggml_type]).reshape(-1).view(np.uint8)
    assert ours.dtype == np.uint8 and np.array_equal(ours, theirs), \
        f"{ggml_type}: first differing byte {np.argmax(ours != theirs)} of {ours.size}"


@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 9), st.sampled_from([32, 256])),
                  elements=st.floats(-1e3, 1e3, width=32)), st.sampled_from(["Q8_0", "Q4_0", "Q4_K"]),
       st.integers(1, 4))
def test_quantize_a_slice_of_rows_at_a_time_gives_the_whole_tensors_bytes(x, ggml_type, chunk):
    """kernels.quantize quantizes _ROWS rows at a time (its temporaries stay a slice's), and so the GGUF
    writer's gguf.quantize: the bytes of any slicing equal those of the whole tensor quantized at once."""
    from lora_np.kernels import quantize as kqz

    assume(x.shape[-1] % lg._SIZES[ggml_type][0] == 0)
    whole = kqz.quantize(x.reshape(-1, x.shape[-1]), ggml_type).reshape(-1)
    saved, kqz._ROWS = kqz._ROWS, chunk
    try:
        sliced = lg.quantize(x, ggml_type)
    finally:
        kqz._ROWS = saved
    assert np.array_equal(sliced, whole), f"{ggml_type}: first differing byte {np.argmax(sliced != whole)}"


def test_quantize_refuses_partial_blocks_and_unknown_types():
    with pytest.raises(GGUFError, match="row length is not a multiple of the block size 32"):
        lg.quantize(np.zeros((2, 40), np.float32), "Q8_0")
    with pytest.raises(GGUFError, match="cannot write tensors of type 'Q4_1'"):
        lg.quantize(np.zeros((2, 32), np.float32), "Q4_1")


def test_written_file_reads_back_in_gguf_py_with_the_converters_types(tmp_path):
    gguf = crosscheck("gguf")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    metadata = {"general.architecture": "llama", "llama.block_count": 3, "llama.rope.freq_base": 500.0,
                "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.tokens": ["a", "b\u00e9"],
                "tokenizer.ggml.token_type": [1, 3], "tokenizer.ggml.scores": [0.5, -1.0], "x.negative": -2,
                "x.u64": 2**40}
    path = lg.write_gguf(tmp_path / "t.gguf", metadata, {"w": (w, "Q8_0"), "n": (w[0], "F32"), "h": (w, "F16")},
                         value_types={"x.u64": "UINT64"}, alignment=64)
    ref = gguf.GGUFReader(path)
    types = {k: [t.name for t in f.types] for k, f in ref.fields.items()}
    assert types["llama.block_count"] == ["UINT32"] and types["llama.rope.freq_base"] == ["FLOAT32"]
    assert types["tokenizer.ggml.token_type"] == ["ARRAY", "INT32"] and types["x.negative"] == ["INT32"]
    assert types["tokenizer.ggml.scores"] == ["ARRAY", "FLOAT32"] and types["x.u64"] == ["UINT64"]
    assert types["tokenizer.ggml.add_bos_token"] == ["BOOL"] and types["general.alignment"] == ["UINT32"]
    for key, value in metadata.items():
        assert ref.fields[key].contents() == value, key
    tensors = {t.name: t for t in ref.tensors}
    assert tensors["w"].tensor_type.name == "Q8_0" and tensors["h"].tensor_type.name == "F16"
    assert np.array_equal(gguf.quants.dequantize(tensors["w"].data, tensors["w"].tensor_type),
                          gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                                                 gguf.GGMLQuantizationType.Q8_0))
    assert np.array_equal(np.asarray(tensors["n"].data), w[0])
    ours = GGUFFile(path)
    assert ours.alignment == 64 and ours.value_types["x.u64"] == ("UINT64", None)
    assert ours.value_types["tokenizer.ggml.tokens"] == ("ARRAY", "STRING")
    assert np.array_equal(ours.load("h"), w.astype(np.float16).astype(np.float32))


# ---------------------------------------------------------------------------- LoRA adapter GGUF
@pytest.mark.parametrize("tie", [False, True])
def test_adapter_gguf_in_llama_cpp_equals_lora_np(tmp_path, tie):
    """Every kind of layer llama.cpp adapts (q/k with the row interleave, GQA k/v, the MLP, the embedding, an
    untied head), with rsLoRA, alpha_pattern and rank_pattern folded or kept: llama.cpp's logits with the
    adapter equal lora_np's within 1e-4 of their scale."""
    base = tmp_path / "base.gguf"
    save_merged_gguf(tiny_model(tie=tie), base, outtype="f32")
    targets = ALL_LINEAR + ([] if tie else ["embed_tokens", "lm_head"])
    model = randomize_adapter(get_peft_model(load_model(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_rslora=True, rank_pattern={"k_proj": 2, "embed_tokens": 3},
        alpha_pattern={"v_proj": 3.0})))
    adapter = save_gguf_adapter(model, tmp_path / "adapter.gguf")
    expected = logits(model)
    with model.disable_adapter():
        assert np.abs(logits(model) - expected).max() > 0.1 * np.abs(expected).max()  # the adapter matters
    assert_rel(llama_cpp_logits(base, adapter), expected, 1e-4, "llama.cpp logits with the adapter")


def test_adapter_gguf_layout_is_llama_cpps(base_gguf, tmp_path):
    """The keys and shapes llama-adapter.cpp checks; f16 on request."""
    model = randomize_adapter(get_peft_model(load_model(base_gguf), LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "embed_tokens"])))
    for outtype, ggml_type in (("f32", "F32"), ("f16", "F16")):
        f = GGUFFile(save_gguf_adapter(model, tmp_path / f"a_{outtype}.gguf", outtype=outtype))
        assert f.metadata["general.type"] == "adapter" and f.metadata["adapter.type"] == "lora"
        assert f.metadata["general.architecture"] == "llama"
        assert f.value_types["adapter.lora.alpha"] == ("FLOAT32", None)
        assert f.metadata["adapter.lora.alpha"] == 16.0
        shapes = {n: (i.shape, i.ggml_type) for n, i in f.tensors.items()}
        assert shapes["blk.1.attn_q.weight.lora_a"] == ((4, 64), ggml_type)  # (r, in)
        assert shapes["blk.1.attn_q.weight.lora_b"] == ((64, 4), ggml_type)  # (out, r)
        assert shapes["token_embd.weight.lora_a"] == ((96, 4), ggml_type)  # (vocab, r): A transposed
        assert shapes["token_embd.weight.lora_b"] == ((64, 4), ggml_type)  # (dim, r)
        assert len(shapes) == 6


def test_peft_to_gguf_to_lora_np_is_exact(base_gguf, tmp_path):
    """Nothing folded (plain LoRA, one alpha): the factors come back bit for bit, rank_pattern included, and the
    --adapter a.gguf of the CLI computes exactly what the PEFT folder does."""
    path = base_gguf
    model = randomize_adapter(get_peft_model(load_model(path), LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR,
                                                                          rank_pattern={"down_proj": 2})))
    model.save_pretrained(tmp_path / "peft")
    adapter = save_gguf_adapter(model, tmp_path / "a.gguf")
    config, tensors = read_gguf_adapter(adapter, load_model(path))
    assert config.r == 4 and config.lora_alpha == 8 and set(config.rank_pattern.values()) == {2}
    saved = safetensors.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(saved)
    for key in saved:
        assert np.array_equal(tensors[key], saved[key]), key
    back = LoraModel.from_pretrained(load_model(path), adapter)
    assert np.array_equal(logits(back), logits(model))
    for name, source in (("folder", tmp_path / "peft"), ("gguf", adapter)):
        assert cli_main(["dump", "--model", str(path), "--adapter", str(source), "--ids", "3,17,9,42",
                         "--out", str(tmp_path / f"{name}.safetensors")]) == 0
    a, b = (safetensors.load_file(tmp_path / f"{n}.safetensors") for n in ("folder", "gguf"))
    assert np.array_equal(a["logits"], b["logits"]) and np.array_equal(a["loss"], b["loss"])
    grads = sorted(k for k in a if k.startswith("grad."))
    assert grads and grads == sorted(k for k in b if k.startswith("grad."))
    assert all(np.array_equal(a[k], b[k]) for k in grads)


@pytest.mark.parametrize("config, what", [
    (dict(use_dora=True), "DoRA"), (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(bias="all"), "bias='all'"), (dict(bias="lora_only"), "bias='lora_only'")])
def test_adapter_export_refuses_what_the_format_cannot_hold(base_gguf, tmp_path, config, what):
    model = get_peft_model(load_model(base_gguf), LoraConfig(r=2, target_modules=["q_proj"], **config))
    with pytest.raises(NotImplementedError, match=f"{what}.*export the merged model"):
        save_gguf_adapter(model, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


@pytest.mark.parametrize("target, other", [("lm_head", "model.embed_tokens.weight"),
                                           ("model.embed_tokens", "lm_head.weight")])
def test_adapter_export_refuses_tied_embeddings(tmp_path, target, other):
    """llama.cpp holds tied embeddings as one tensor and looks adapters up by tensor: an adapter on either use
    would apply to both (on token_embd its shapes then fail an assertion and abort the process)."""
    model = get_peft_model(tiny_model(tie=True), LoraConfig(r=2, target_modules=[target]))
    with pytest.raises(NotImplementedError, match=f"{target} shares its weight with {other}.*export the merged"):
        save_gguf_adapter(model, tmp_path / "a.gguf")


def test_reading_a_bad_adapter_gguf_names_the_problem(base_gguf, tmp_path):
    base = load_model(base_gguf)
    a = np.zeros((2, 64), np.float32)
    cases = [({"general.type": "model"}, {}, "general.type is 'model', expected 'adapter'"),
             ({"general.architecture": "qwen2"}, {}, "general.architecture is 'qwen2', expected 'llama'"),
             ({}, {"blk.0.attn_q.weight.lora_x": a}, "neither a .lora_a nor a .lora_b"),
             ({}, {"blk.0.attn_q.weight.lora_a": a}, "has lora_a but not its other half"),
             ({}, {"blk.9.attn_q.weight.lora_a": a, "blk.9.attn_q.weight.lora_b": a.T.copy()},
              "'blk.9.attn_q.weight' is not a weight"),
             ({}, {"blk.0.attn_k.weight.lora_a": a, "blk.0.attn_k.weight.lora_b": a.T.copy()},
              r"lora_b \(64, 2\) do not fit the base tensor \(32, 64\)")]
    for i, (meta, tensors, message) in enumerate(cases):
        metadata = {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora",
                    "adapter.lora.alpha": 4.0, **meta}
        bad = lg.write_gguf(tmp_path / f"bad{i}.gguf", metadata,
                            {k: (v, "F32") for k, v in (tensors or {"blk.0.attn_q.weight.lora_a": a,
                                                                    "blk.0.attn_q.weight.lora_b": a.T.copy()}).items()})
        with pytest.raises(GGUFError, match=message):
            LoraModel.from_pretrained(base, bad)


def test_peft_adapter_through_the_cli_into_llama_cpp_equals_pytorch_peft(tmp_path):
    """The chain a user runs: a transformers model and a PEFT adapter (rsLoRA, rank_pattern) saved by PyTorch;
    `lora-np export` writes the base as GGUF and the adapter as a GGUF LoRA; llama.cpp's logits equal
    PyTorch + PEFT's within 1e-4 of their scale."""
    torch = crosscheck("torch")
    transformers = crosscheck("transformers")
    peft = crosscheck("peft")
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=2.0**-17, rope_theta=500.0, max_position_embeddings=256)).eval()
    ref.save_pretrained(tmp_path / "model")
    torch.manual_seed(1)
    pm = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                     "down_proj"],
                                                  use_rslora=True, rank_pattern={"down_proj": 2},
                                                  init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = pm(torch.tensor([IDS])).logits[0].numpy()
    model_args = ["--model", str(tmp_path / "model")]
    assert cli_main(["export", *model_args, "--format", "gguf", "--outtype", "f32",
                     "--out", str(tmp_path / "base.gguf")]) == 0
    assert cli_main(["export", *model_args, "--adapter", str(tmp_path / "adapter"), "--format", "gguf-lora",
                     "--out", str(tmp_path / "adapter.gguf")]) == 0
    assert_rel(llama_cpp_logits(tmp_path / "base.gguf", tmp_path / "adapter.gguf"), expected, 1e-4,
               "llama.cpp + exported adapter vs PyTorch + PEFT")


# ---------------------------------------------------------------------------- merged GGUF
@pytest.mark.parametrize("tie", [False, True])
def test_merged_gguf_in_llama_cpp_equals_lora_np(tmp_path, tie):
    model = randomize_adapter(get_peft_model(tiny_model(tie=tie), LoraConfig(r=4, lora_alpha=8,
                                                                             target_modules=ALL_LINEAR)))
    expected = logits(model)
    path = save_merged_gguf(model, tmp_path / "merged.gguf", outtype="f32")
    f = GGUFFile(path)
    assert ("output.weight" in f.tensors) != tie and f.metadata["general.file_type"] == 0
    assert f.metadata["llama.attention.head_count_kv"] == 2
    assert f.value_types["llama.rope.freq_base"] == ("FLOAT32", None)
    assert_close(logits(load_model(path)), expected, rtol=0, atol=1e-5 * np.abs(expected).max(),
                 name="lora_np reading its merged GGUF")
    assert_rel(llama_cpp_logits(path), expected, 1e-4, "llama.cpp on the merged GGUF")


def test_transformers_loads_the_merged_gguf_and_matches_in_float64(tmp_path):
    torch = crosscheck("torch")
    transformers = crosscheck("transformers")
    model = randomize_adapter(get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR)))
    save_merged_gguf(model, tmp_path / "merged.gguf", outtype="f32")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="merged.gguf",
                                                            dtype=torch.float64).eval()
    patch_float64(torch, ref)
    with torch.no_grad():
        theirs = ref(torch.tensor([IDS])).logits[0].numpy()
    ours = logits(load_model(tmp_path / "merged.gguf", dtype="float64"))
    assert ref.config.num_key_value_heads == 2 and ref.config.rope_parameters["rope_theta"] == 500.0
    assert_close(ours, theirs, rtol=1e-10, atol=1e-10 * np.abs(theirs).max(), name="transformers (gguf_file=)")


@pytest.mark.parametrize("outtype, weight_type", [("f16", "F16"), ("q8_0", "Q8_0"), ("q4_0", "Q4_0")])
def test_merged_gguf_outtypes_quantize_as_gguf_py_and_run_in_llama_cpp(tmp_path, outtype, weight_type):
    gguf = crosscheck("gguf")
    model = tiny_model()
    path = save_merged_gguf(model, tmp_path / f"m_{outtype}.gguf", outtype=outtype)
    f, ref = GGUFFile(path), gguf.GGUFReader(path)
    expected_ftype = {"f16": 1, "q8_0": 7, "q4_0": 2}[outtype]
    assert f.metadata["general.file_type"] == expected_ftype
    assert ("general.quantization_version" in f.metadata) == (outtype != "f16")
    assert {f.tensors[n].ggml_type for n in f.tensors if n.endswith("_norm.weight")} == {"F32"}
    raw = {t.name: t for t in ref.tensors}
    gate = model.model.layers[1].mlp.gate_proj.weight.data
    assert f.tensors["blk.1.ffn_gate.weight"].ggml_type == weight_type
    qtype = gguf.GGMLQuantizationType[weight_type]
    assert np.array_equal(np.asarray(raw["blk.1.ffn_gate.weight"].data).reshape(-1).view(np.uint8),
                          gguf.quants.quantize(gate, qtype).reshape(-1).view(np.uint8))
    assert np.array_equal(load_model(path).model.layers[1].mlp.gate_proj.weight.data,
                          gguf.quants.dequantize(gguf.quants.quantize(gate, qtype), qtype))
    # llama.cpp runs it; its logits are not compared elementwise here: its F16 / Q8_0 / Q4_0 matmuls round the
    # activations to F16 / 8 bits as well (the f32 file above is compared at 1e-4)
    theirs = llama_cpp_logits(path)
    assert np.isfinite(theirs).all() and theirs.shape == (len(IDS), 96)


def test_merged_gguf_carries_the_gguf_sources_tokenizer_and_chat_template(tmp_path):
    """A tiny model with SmolLM2's vocabulary, exported with the SmolLM2 GGUF as its source: the tokenizer.*
    keys (with their types) and the chat template come over, and llama.cpp tokenizes as lora_np does."""
    path = lora_np.default_model_path()
    source = GGUFFile(path)
    model = tiny_model(vocab_size=49152, hidden_size=32, intermediate_size=32, num_hidden_layers=1)
    out = GGUFFile(save_merged_gguf(model, tmp_path / "m.gguf", source=path, outtype="q8_0"))
    for key in source.metadata:
        if key.startswith("tokenizer."):
            assert out.metadata[key] == source.metadata[key] and out.value_types[key] == source.value_types[key], key
    assert out.metadata["general.name"] == source.metadata["general.name"]
    assert "{% for message in messages %}" in out.metadata["tokenizer.chat_template"]
    llama_cpp = crosscheck("llama_cpp")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, n_threads=2, verbose=False, vocab_only=True)
    text = "Rewrite the date: the 21st of September, 1947."
    assert llm.tokenize(text.encode(), add_bos=False) == lora_np.load_tokenizer(path).encode(text)


def test_merged_gguf_from_a_hugging_face_folder_converts_its_tokenizer(tmp_path):
    """A byte-level BPE trained by `tokenizers` (SmolLM2's pre-tokenizer: digits, then byte-level) in a folder
    with SmolLM2's chat template: the exported GGUF tokenizes in llama.cpp as `tokenizers` does, special tokens
    and the padding up to the model's vocabulary included, and carries the template and special ids."""
    tokenizers = crosscheck("tokenizers")
    from lora_np.demo import DATA_DIR
    from lora_np.export import save_merged

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    with open(os.path.join(DATA_DIR, "dates_train.jsonl"), encoding="utf-8") as fh:
        tok.train_from_iterator(fh.read().splitlines(), trainer)
    folder = save_merged(tiny_model(vocab_size=416), tmp_path / "hf")  # 16 ids past the tokenizer's: [PAD<id>]
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    template = GGUFFile(lora_np.default_model_path()).metadata["tokenizer.chat_template"]
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "chat_template": template}))
    f = GGUFFile(save_merged_gguf(load_model(folder), tmp_path / "m.gguf", source=folder, outtype="f32"))
    md = f.metadata
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "smollm"
    assert md["tokenizer.chat_template"] == template and len(md["tokenizer.ggml.tokens"]) == 416
    assert md["tokenizer.ggml.bos_token_id"] == 1 and md["tokenizer.ggml.eos_token_id"] == 2
    assert md["tokenizer.ggml.token_type"][:3] == [3, 3, 3] and md["tokenizer.ggml.token_type"][-1] == 5
    assert md["tokenizer.ggml.tokens"][-1] == "[PAD415]" and f.value_types["tokenizer.ggml.token_type"] == (
        "ARRAY", "INT32")
    llama_cpp = crosscheck("llama_cpp")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, n_threads=2, verbose=False, vocab_only=True)
    for text in ("Rewrite the date: the 21st of September, 1947.", "<|im_start|>user\nFeb 4, 2043<|im_end|>",
                 "  Monday,\tApril 1 2010  \u00e9t\u00e9 \U0001F600 12345"):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text).ids, text


def test_merged_gguf_refuses_a_tokenizer_gguf_cannot_hold(tmp_path):
    from lora_np.export import save_merged

    folder = save_merged(tiny_model(), tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(NotImplementedError, match="only byte-level BPE tokenizers without a normalizer"):
        save_merged_gguf(load_model(folder), tmp_path / "m.gguf", source=folder)
    assert not (tmp_path / "m.gguf").exists()


def test_merged_gguf_refuses_a_config_gguf_cannot_express(tmp_path):
    model = tiny_model(mlp_bias=True)
    with pytest.raises(NotImplementedError, match="LlamaConfig.mlp_bias = True has no GGUF key in llama.cpp's "
                                                  "'llama' architecture"):
        save_merged_gguf(model, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_config_keys_are_the_families_gguf_keys_inverted():
    """convert_hf_to_gguf.py's llama keys: read by the family's from_gguf, or accepted by it at one value that
    llama.cpp's default for an absent key need not equal (value_length: n_embd / n_head)."""
    config = tiny_model().config
    keys, types = gguf_config_keys(config, "llama", {"token_embd.weight": (96, 64), "output.weight": (96, 64)})
    assert keys == {"llama.embedding_length": 64, "llama.feed_forward_length": 96, "llama.block_count": 2,
                    "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
                    "llama.attention.key_length": 16, "llama.attention.value_length": 16,
                    "llama.rope.dimension_count": 16, "llama.vocab_size": 96,
                    "llama.attention.layer_norm_rms_epsilon": 2.0**-17, "llama.rope.freq_base": 500.0,
                    "llama.context_length": 256}
    assert types["llama.rope.freq_base"] == "FLOAT32" and types["llama.block_count"] == "UINT32"


def test_row_map_inverts_the_llama_interleave():
    config = tiny_model().config
    w = np.random.default_rng(0).standard_normal((32, 64))
    perm, offset = gguf_row_map(LlamaForCausalLM, "blk.0.attn_k.weight", w.shape, config)
    assert not offset.any()
    assert np.array_equal(LlamaForCausalLM.from_gguf_tensor("blk.0.attn_k.weight",
                                                            to_gguf_rows((perm, offset), w), config), w)
    assert gguf_row_map(LlamaForCausalLM, "blk.0.attn_v.weight", w.shape, config) is None


@pytest.mark.parametrize("model_type, fields", [
    ("granite", dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=2.0)),
    ("olmo2", {}), ("qwen2", {}), ("qwen3", {}), ("smollm3", {}), ("phi3", {})])
def test_other_families_export_through_their_own_gguf_tables(tmp_path, model_type, fields):
    """No per-family export code: Granite (its *_scale keys), OLMo 2 (q/k norms, post-norms), Qwen2 (q/k/v
    biases, no interleave), Qwen3 (head_dim 128 apart from hidden / heads), SmolLM3 and Phi-3 (fused qkv and
    gate_up) go out through the tables their loaders read, merged and as an adapter, and llama.cpp computes
    what lora_np does. (The Gemmas load too; llama.cpp's GELU reads its input through a float16 table, so
    their logits differ by ~5e-4 and are not compared here.)"""
    config_cls, model_cls = family(model_type)
    model = tiny_model(model_cls=model_cls, config_cls=config_cls, **fields)
    base = save_merged_gguf(model, tmp_path / "base.gguf", outtype="f32")
    expected_base = logits(model)
    assert np.array_equal(logits(load_model(base)), expected_base)
    lora = randomize_adapter(get_peft_model(load_model(base), LoraConfig(r=4, lora_alpha=8,
                                                                        target_modules="all-linear")))
    adapter = save_gguf_adapter(lora, tmp_path / "adapter.gguf")
    assert_rel(llama_cpp_logits(base), expected_base, 1e-4, f"llama.cpp on a {model_type} GGUF")
    assert_rel(llama_cpp_logits(base, adapter), logits(lora), 1e-4, f"llama.cpp with a {model_type} adapter")


# ---------------------------------------------------------------------------- SmolLM2's Q4_1 base
def test_smollm2_q4_1_greedy_generation_with_an_adapter_agrees_with_llama_cpp(tmp_path):
    """On the demo's model (Q4_1 weights, which llama.cpp multiplies with 8-bit-quantized activations) and
    prompts, llama.cpp with the exported adapter picks lora_np's greedy token at every step where lora_np's
    choice is clear (top-1 ahead by at least 0.25; a nearer tie is rounding's to decide)."""
    from lora_np.demo import DATA_DIR, _read_jsonl

    path = lora_np.default_model_path()
    tokenizer = lora_np.load_tokenizer(path)
    model = randomize_adapter(get_peft_model(load_model(path), LoraConfig(r=8, lora_alpha=16,
                                                                          target_modules=["q_proj", "v_proj"])),
                              scale=0.02)
    adapter = save_gguf_adapter(model, tmp_path / "adapter.gguf")
    llama_cpp = crosscheck("llama_cpp")
    llm = llama_cpp.Llama(path, lora_path=str(adapter), logits_all=True, n_ctx=256, n_threads=2, verbose=False)
    checked = steps = 0
    for row in _read_jsonl(os.path.join(DATA_DIR, "dates_test.jsonl"))[:3]:
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True)
        out = model.generate(np.array([prompt]), max_new_tokens=8, eos_token_id=tokenizer.eos_token_id)[0]
        ours = model(out[None]).logits.data[0]
        llm.reset()
        llm.eval(out.tolist())
        theirs = np.array(llm.scores[:len(out)])
        for t in range(len(prompt) - 1, len(out) - 1):  # position t predicts token t + 1
            steps += 1
            top2 = np.sort(ours[t])[-2:]
            if top2[1] - top2[0] >= 0.25:
                checked += 1
                assert int(np.argmax(theirs[t])) == out[t + 1], \
                    f"{row['messages'][1]['content']!r}: step {t - len(prompt) + 1}: llama.cpp picks " \
                    f"{int(np.argmax(theirs[t]))}, lora_np {out[t + 1]} (margin {top2[1] - top2[0]:.3f})"
        with model.disable_adapter():
            base = model(out[None]).logits.data[0]
        assert np.abs(theirs - ours).max() < np.abs(theirs - base).max()  # llama.cpp applied the adapter
    assert checked >= 0.75 * steps, f"only {checked} of {steps} steps had a clear greedy choice"


# ---------------------------------------------------------------------------- the command
def test_cli_export_errors_are_one_line(base_gguf, tmp_path, capsys):
    path = str(base_gguf)
    assert cli_main(["export", "--model", path, "--format", "gguf-lora", "--out", str(tmp_path / "a.gguf")]) == 2
    assert "--format gguf-lora exports an adapter: give --adapter" in capsys.readouterr().err
    assert cli_main(["export", "--model", path, "--format", "gguf", "--outtype", "q4_1",
                     "--out", str(tmp_path / "m.gguf")]) == 2
    assert "--outtype q4_1 is not one for --format gguf (f16, f32, q8_0, q4_0)" in capsys.readouterr().err
    assert cli_main(["export", "--model", path, "--format", "gguf", "--out", str(tmp_path)]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err
    assert cli_main(["export", "--model", path, "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    assert GGUFFile(tmp_path / "m.gguf").metadata["general.file_type"] == 1  # f16 by default, as the converter


def test_cli_import_gguf_lora_writes_a_folder_peft_loads(base_gguf, tmp_path):
    """`lora-np import --from gguf-lora` (ranks from the shapes: rank_pattern) gives a PEFT folder that PEFT
    itself loads onto transformers' model of the same GGUF base, computing lora_np's logits (float64, 1e-10)."""
    torch = crosscheck("torch")
    transformers = crosscheck("transformers")
    peft = crosscheck("peft")
    path = base_gguf
    model = randomize_adapter(get_peft_model(load_model(path), LoraConfig(r=4, lora_alpha=4, target_modules=[
        "q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2})))
    save_gguf_adapter(model, tmp_path / "a.gguf")
    assert cli_main(["import", "--from", "gguf-lora", str(tmp_path / "a.gguf"), "--model", str(path),
                     "--out", str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4 and config["peft_type"] == "LORA"
    assert sorted(config["rank_pattern"].values()) == [2, 2]
    ours = LoraModel.from_pretrained(load_model(path, dtype="float64"), tmp_path / "peft")
    assert np.array_equal(logits(LoraModel.from_pretrained(load_model(path), tmp_path / "peft")), logits(model))
    ref = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                            dtype=torch.float64)
    theirs_model = peft.PeftModel.from_pretrained(ref, tmp_path / "peft").eval()
    patch_float64(torch, theirs_model.base_model.model)
    with torch.no_grad():
        theirs = theirs_model(torch.tensor([IDS])).logits[0].numpy()
    assert_close(logits(ours), theirs, rtol=1e-10, atol=1e-10 * np.abs(theirs).max(), name="PEFT on the import")


def test_demo_ends_with_the_adapter_gguf_and_the_llama_cpp_and_ollama_lines(base_gguf, tmp_path):
    from lora_np.demo import SYSTEM, serve_lines

    model = randomize_adapter(get_peft_model(load_model(base_gguf), LoraConfig(r=2, target_modules=["q_proj"])))
    text = serve_lines(model, str(base_gguf), str(tmp_path), "Feb 4, 2043")
    adapter = tmp_path / "adapter.gguf"
    assert np.array_equal(logits(LoraModel.from_pretrained(load_model(base_gguf), adapter)), logits(model))
    assert f"llama-cli -m {base_gguf} --lora {adapter} -sys \"{SYSTEM}\" -p \"Feb 4, 2043\"" in text
    assert (tmp_path / "Modelfile").read_text() == f'FROM {base_gguf}\nADAPTER {adapter}\nSYSTEM """{SYSTEM}"""\n'
    assert f"ollama create lora-np-dates -f {tmp_path / 'Modelfile'}" in text


# ---------------------------------------------------------------------------- merged GGUF of RoPE-scaled models
# tiny_model's wavelengths 2 pi / 500^(-k/8): 6.3, 13.6, 29, 65, ...; positions run past original_max_position_
# embeddings (8 < len(IDS)). Llama 3 with low/high_freq_factor 0.75/1 (wavelength bands 10.7 and 8) has no dim
# in the smooth band: the factors are 1 and 4, exact in float32, so the file's RoPE is the config's exactly; with
# 1/4 (bands 8 and 2) the first dim is in the band and its factor is the converter's float32 rounding.
LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 8}
ROPE_SCALINGS = {
    "llama3 exact": ({**LLAMA3, "low_freq_factor": 0.75, "high_freq_factor": 1.0}, 1e-10),
    # a factor off by <= 2^-24 relative turns an angle of <= len(IDS) radians by <= 6e-7
    "llama3 smooth band": ({**LLAMA3, "low_freq_factor": 1.0, "high_freq_factor": 4.0}, 1e-6),
    "linear": ({"rope_type": "linear", "factor": 4.0}, 1e-10),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}, 1e-10),
}


def float64_logits(model, ids=IDS):
    for _, p in model.named_parameters():
        p.data = p.data.astype(np.float64)
    return logits(model, ids)


def converters_llama3_factors(torch, rope_theta, rope, dim):
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors, as it is written there (torch float32)."""
    import math
    freqs = 1.0 / (rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low_freq_factor, high_freq_factor = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context_len = rope["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low_freq_factor, old_context_len / high_freq_factor
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(rope_factors, dtype=torch.float32).numpy()


@pytest.mark.parametrize("case", list(ROPE_SCALINGS))
def test_merged_gguf_of_a_rope_scaled_model_reads_back_and_runs_in_llama_cpp(tmp_path, case):
    """Llama 3's RoPE as the rope_freqs tensor (the converter's float32 factors, no scaling keys), linear and
    yarn as the rope.scaling.* keys: lora_np reads the file back to the same RoPE (float64: exactly where the
    factors are exact in float32, else to float32 precision), llama.cpp computes the same logits."""
    rope, rtol = ROPE_SCALINGS[case]
    model = tiny_model(rope_scaling=rope)
    expected = logits(model)
    path = save_merged_gguf(model, tmp_path / "m.gguf")
    f = GGUFFile(path)
    scaling_keys = {k: v for k, v in f.metadata.items() if k.startswith("llama.rope.scaling.")}
    if rope["rope_type"] == "llama3":
        torch = crosscheck("torch")
        assert scaling_keys == {} and f.tensors["rope_freqs.weight"].ggml_type == "F32"
        factors = f.load("rope_freqs.weight")
        assert np.array_equal(factors, converters_llama3_factors(torch, 500.0, rope, 16))
        assert (set(factors.tolist()) == {1.0, 4.0}) == (rtol == 1e-10)
        again = save_merged_gguf(load_model(path), tmp_path / "again.gguf")  # rope_freq_factors written back
        assert np.array_equal(GGUFFile(again).load("rope_freqs.weight"), factors)
    else:
        assert "rope_freqs.weight" not in f.tensors
        assert scaling_keys == {"llama.rope.scaling.type": rope["rope_type"], "llama.rope.scaling.factor": 4.0,
                                **({"llama.rope.scaling.original_context_length": 8} if case == "yarn" else {})}
    ours = logits(load_model(path, dtype="float64"))
    theirs = float64_logits(model)
    assert_rel(ours, theirs, rtol, f"lora_np reading the {case} GGUF (float64)")
    assert_rel(llama_cpp_logits(path), expected, 1e-4, f"llama.cpp on the {case} GGUF")


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0},
                                  {"rope_type": "yarn", "factor": 4.0, "truncate": False}])
def test_merged_gguf_refuses_a_rope_scaling_llama_cpp_has_no_key_for(tmp_path, rope):
    model = tiny_model(rope_scaling=rope)
    with pytest.raises(NotImplementedError, match=f"LlamaConfig.rope_scaling = .*'{rope['rope_type']}'.* has no "
                                                  "GGUF key"):
        save_merged_gguf(model, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


# Phi-3's longrope: original_max_position_embeddings 8 < len(IDS) (and llama.cpp's n_ctx 256 > 8), so both pick the
# long factors. Factors in quarters and an attention factor of 1.25 are exact in float32; the converter's
# attention factor sqrt(1 + ln 32 / ln 8) and factors such as 1.1 are rounded to float32 in the file (a factor or
# the cos/sin scale off by <= 2^-24 relative moves the logits by <= ~1e-6 of their scale).
LONGROPE = {
    "phi3": (dict(long_factor=[1.0 + 0.1 * i for i in range(8)], short_factor=[1.0 + 0.05 * i for i in range(8)]),
             {}, 1e-6),
    "phi4-mini": (dict(long_factor=[1.0, 1.25, 2.5, 4.0, 8.0, 16.0], short_factor=[1.0, 1.0, 1.5, 1.5, 2.0, 2.0],
                       partial_rotary_factor=0.75), dict(tie=True), 1e-6),
    "phi4-mini attention_factor": (dict(long_factor=[1.0, 1.25, 2.5, 4.0, 8.0, 16.0],
                                        short_factor=[1.0, 1.0, 1.5, 1.5, 2.0, 2.0], partial_rotary_factor=0.75,
                                        attention_factor=1.25), dict(tie=True), 1e-10),
}


@pytest.mark.parametrize("case", list(LONGROPE))
def test_merged_gguf_of_a_longrope_phi3_reads_back_and_runs_in_llama_cpp(tmp_path, case):
    """Phi-3 / Phi-4-mini (partial rotary, tied) longrope as convert_hf_to_gguf.py's Phi3MiniModel writes it: the
    rope_factors_long / rope_factors_short tensors (F32), rope.scaling.attn_factor (the config's attention_factor,
    else the converter's formula) and rope.scaling.original_context_length; lora_np reads the file back to the
    same RoPE (float64: exactly where factors and attention factor are exact in float32, else to float32
    precision), llama.cpp computes the same logits past original_max_position_embeddings, and a re-export of the
    loaded file writes the same factors and keys."""
    import math
    rope, fields, rtol = LONGROPE[case]
    config_cls, model_cls = family("phi3")
    model = tiny_model(model_cls=model_cls, config_cls=config_cls, original_max_position_embeddings=8,
                       rope_scaling={"rope_type": "longrope", **rope}, **fields)
    expected = logits(model)
    path = save_merged_gguf(model, tmp_path / "m.gguf")
    f = GGUFFile(path)
    scale = 256 / 8  # the converter: max_position_embeddings / original_max_position_embeddings
    attn_factor = rope.get("attention_factor", math.sqrt(1 + math.log(scale) / math.log(8)))
    scaling_keys = {k: v for k, v in f.metadata.items() if k.startswith("phi3.rope.")}
    assert scaling_keys == {"phi3.rope.scaling.attn_factor": np.float32(attn_factor),
                            "phi3.rope.scaling.original_context_length": 8, "phi3.rope.freq_base": 500.0,
                            "phi3.rope.dimension_count": 12 if "partial_rotary_factor" in rope else 16}
    for kind in ("long", "short"):
        name = f"rope_factors_{kind}.weight"
        assert f.tensors[name].ggml_type == "F32"
        assert np.array_equal(f.load(name), np.array(rope[f"{kind}_factor"], np.float32))
    assert ("output.weight" in f.tensors) != fields.get("tie", False)
    ours = logits(load_model(path, dtype="float64"))
    theirs = float64_logits(model)
    assert_rel(ours, theirs, rtol, f"lora_np reading the {case} GGUF (float64)")
    assert_rel(llama_cpp_logits(path), expected, 1e-4, f"llama.cpp on the {case} GGUF")
    again = GGUFFile(save_merged_gguf(load_model(path), tmp_path / "again.gguf"))
    assert {k: v for k, v in again.metadata.items() if k.startswith("phi3.rope.")} == scaling_keys
    for name in ("rope_factors_long.weight", "rope_factors_short.weight"):
        assert np.array_equal(again.load(name), f.load(name))


# ---------------------------------------------------------------------------- the error requantizing adds
@pytest.mark.parametrize("outtype", ["q8_0", "q4_0"])
def test_requantized_merge_reports_the_error_gguf_py_measures(tmp_path, outtype, capsys):
    """Merging into a Q8_0 base and requantizing: save_merged_gguf(errors=) gives per tensor the error of the
    merged weight and of the adapter's update, equal to gguf-py's quantize / dequantize of the merged weights
    (read from an f32 export of the same merge) against the base file's blocks; the CLI prints the summary."""
    gguf = crosscheck("gguf")
    from lora_np.export import requantization_summary

    base = save_merged_gguf(tiny_model(), tmp_path / "base.gguf", outtype="q8_0")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR)
    randomize_adapter(get_peft_model(load_model(base, dequantize=True), config), scale=0.1).save_pretrained(
        tmp_path / "adapter")

    def merged():
        return LoraModel.from_pretrained(load_model(base, dequantize=True), tmp_path / "adapter")

    save_merged_gguf(merged(), tmp_path / "m_f32.gguf", outtype="f32")
    errors = {}
    path = save_merged_gguf(merged(), tmp_path / "m.gguf", outtype=outtype, errors=errors)
    float_file = {t.name: t for t in gguf.GGUFReader(tmp_path / "m_f32.gguf").tensors}
    base_file, written = ({t.name: t for t in gguf.GGUFReader(p).tensors} for p in (base, path))
    matrices = {n for n, t in float_file.items() if len(t.shape) == 2}
    assert set(errors) == matrices
    adapted = {f"blk.{i}.{s}.weight" for i in range(2) for s in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                                  "ffn_gate", "ffn_up", "ffn_down")}
    for name, reported in errors.items():
        w = np.asarray(float_file[name].data, dtype=np.float64)  # W', as the file's rows hold it
        qtype = gguf.GGMLQuantizationType[reported["type"]]
        blocks = gguf.quants.quantize(w.astype(np.float32), qtype)
        assert qtype == written[name].tensor_type == gguf.GGMLQuantizationType[outtype.upper()]
        assert np.array_equal(np.asarray(written[name].data).view(np.uint8), blocks.view(np.uint8))
        lost = np.linalg.norm(gguf.quants.dequantize(blocks, qtype).astype(np.float64) - w)
        assert reported["error"] == pytest.approx(lost / np.linalg.norm(w), rel=1e-12), name
        b = base_file[name]
        w_base = gguf.quants.dequantize(np.asarray(b.data), b.tensor_type).astype(np.float64)  # deq(Q_base)
        if name in adapted:
            assert reported["delta_error"] == pytest.approx(lost / np.linalg.norm(w - w_base), rel=1e-12), name
        else:
            assert reported["delta_error"] is None and np.array_equal(w, w_base), name
    assert all(errors[n]["error"] > 0 and errors[n]["delta_error"] > 0 for n in adapted)
    assert cli_main(["export", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--format", "gguf",
                     "--outtype", outtype, "--out", str(tmp_path / "cli.gguf")]) == 0
    printed = capsys.readouterr().out.splitlines()
    summary = requantization_summary(errors)
    assert printed == [*summary.splitlines(), f"wrote {tmp_path / 'cli.gguf'} (gguf, {outtype})"]
    assert len(printed) == 3 and all("worst" in line and "median" in line for line in printed[:2])
