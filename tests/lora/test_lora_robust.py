"""LoRA adapters under hostile input: adapter names, ranks that would not fit in memory,
configs that disagree with their weights, bad regexes and damaged adapter folders.

Each refusal is a ValueError (or FileNotFoundError) whose message names the file and the
key or field; nothing is allocated or written before it."""
import json
import math
import os
import tempfile
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lora_np
from lora_np import functional as F
from lora_np import nn
from lora_np.lora import LoraConfig, LoraModel, get_peft_model
from lora_np.lora.config import check_adapter_name
from lora_np.lora.model import check_adapter_memory
from lora_np.lora.targets import plan_adapter, resolve_config
from lora_np.models import LlamaConfig, LlamaForCausalLM

HIDDEN, VOCAB = 16, 37


def _llama(seed=0):
    F.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg, dtype=np.float64)


def _tree(root):
    """Every path under `root` (folders and files), relative to it."""
    out = set()
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            out.add(os.path.relpath(os.path.join(folder, name), root))
    return out


def _lora_paths(lm):
    return sorted(n for n, m in lm.model.named_modules() if isinstance(m, lora_np.lora.LoraLayer))


# -- adapter names ----------------------------------------------------------------------------------
HOSTILE_NAMES = ["", ".", "..", "../escape", "a/b", "/tmp/abs", "a\\b", "..\\x", "nul\x00byte", "tab\tname",
                 ".hidden", "adapter_config.json", "adapter_model.safetensors", "C:drive", "keys", "_modules",
                 "training", "x" * 256, "\ud800", 3, None, b"bytes", ["default"]]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
def test_hostile_adapter_names_are_refused_everywhere(name, tmp_path):
    """Every entry point that takes an adapter name refuses these before doing anything."""
    config = LoraConfig(r=2, target_modules=["q_proj"])
    lm = get_peft_model(_llama(), config)
    lm.save_pretrained(tmp_path / "saved")
    before = _tree(tmp_path)
    calls = {
        "get_peft_model": lambda: get_peft_model(_llama(), config, adapter_name=name),
        "add_adapter": lambda: lm.add_adapter(name, config),
        "load_adapter": lambda: lm.load_adapter(tmp_path / "saved", name),
        "from_pretrained": lambda: LoraModel.from_pretrained(_llama(), tmp_path / "saved", adapter_name=name),
        "add_weighted_adapter": lambda: lm.add_weighted_adapter(["default"], [1.0], name, combination_type="linear"),
        "set_adapter": lambda: lm.set_adapter(name if not isinstance(name, list) else [3]),
        "delete_adapter": lambda: lm.delete_adapter(name),
        "save_pretrained": lambda: lm.save_pretrained(tmp_path / "out", selected_adapters=[name]),
    }
    for where, call in calls.items():
        with pytest.raises(ValueError, match="adapter name") as e:
            call()
        assert where.split("_")[0] in str(e.value) or "adapter_name" in str(e.value), (where, str(e.value))
    assert list(lm.peft_config) == ["default"] and lm.active_adapters == ["default"]
    assert _tree(tmp_path) == before  # nothing written anywhere


def test_save_pretrained_wants_a_list_of_names(tmp_path):
    lm = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="selected_adapters: expected a list of adapter names, got str 'default'"):
        lm.save_pretrained(tmp_path, selected_adapters="default")
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['other'\]"):
        lm.save_pretrained(tmp_path, selected_adapters=["default", "other"])
    assert os.listdir(tmp_path) == []  # all names are checked before anything is written


NAME_CHARS = st.characters(codec="utf-8") | st.sampled_from(list("./\\:\x00\x7f\n *?<>|\"") + ["..", "default"])


@given(name=st.lists(NAME_CHARS, max_size=8).map("".join) | st.sampled_from(["..", ".", "", "/", "keys"]))
def test_any_adapter_name_is_refused_or_saved_inside_the_folder(name):
    """A name is either refused with ValueError, or save_pretrained writes exactly `<out>/<name>/`'s two
    files (and the default adapter's two files in `<out>`), nothing else anywhere under the temp root."""
    lm = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with tempfile.TemporaryDirectory() as root:
        out = os.path.join(root, "out")
        try:
            lm.add_adapter(name, LoraConfig(r=3, target_modules=["v_proj"]))
        except ValueError as e:
            assert "adapter name" in str(e) or "already exists" in str(e)
            assert name in ("default",) or check_adapter_name_refuses(name)
            return
        lm.save_pretrained(out)
        files = {"adapter_config.json", "adapter_model.safetensors"}
        assert _tree(root) == {"out"} | {f"out/{f}" for f in files} | {f"out/{name}"} | {f"out/{name}/{f}" for f in files}
        assert json.loads(open(os.path.join(out, name, "adapter_config.json")).read())["r"] == 3
        again = LoraModel.from_pretrained(_llama(), out)
        again.load_adapter(os.path.join(out, name), name)
        assert again.peft_config[name].r == 3


def check_adapter_name_refuses(name):
    try:
        check_adapter_name(name)
    except ValueError:
        return True
    return False


def test_a_planted_link_cannot_redirect_a_save(tmp_path):
    """Second line of defence: `<out>/<name>` that is a link to elsewhere is refused, nothing written there."""
    lm = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    lm.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "out" / "other")
    with pytest.raises(ValueError, match=r"out/other resolves to .*elsewhere, outside the target folder"):
        lm.save_pretrained(tmp_path / "out", selected_adapters=["other"])
    assert os.listdir(tmp_path / "elsewhere") == []


# -- ranks that would not fit in memory -------------------------------------------------------------
def _refused_quickly_and_small(call, match):
    """`call` raises ValueError matching `match` within a second, its Python allocations under 1 MB."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ValueError, match=match) as e:
            call()
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0 and peak < 1 << 20, (elapsed, peak)
    return str(e.value)


@pytest.mark.parametrize("kw", [dict(r=10**9), dict(r=2, rank_pattern={"v_proj": 10**12}), dict(r=10**40)])
def test_a_rank_too_large_for_memory_is_refused_before_allocating(kw):
    lm = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    msg = _refused_quickly_and_small(lambda: lm.add_adapter("big", LoraConfig(target_modules=["q_proj", "v_proj"], **kw)),
                                     r"LoraConfig\.r: an adapter of rank .* needs [\d,]+ bytes, more than")
    assert str(max([kw["r"], *kw.get("rank_pattern", {}).values()])) in msg.replace(",", "")
    assert list(lm.peft_config) == ["default"] and _lora_paths(lm) == ["model.layers.0.self_attn.q_proj"]
    assert "big" not in lm.model.model.layers[0].self_attn.q_proj.r
    _refused_quickly_and_small(lambda: get_peft_model(_llama(), LoraConfig(r=10**9, target_modules=["q_proj"])),
                               "needs")


@given(r=st.integers(1, 4096), out=st.integers(1, 64), limit=st.integers(0, 1 << 22),
       dora=st.booleans(), embed=st.booleans())
def test_the_memory_rule_is_the_bytes_of_the_factors(r, out, limit, dora, embed):
    """Accepted exactly when the factors (r·(in+out) values, DoRA's m) plus one float64 copy of the
    larger factor fit in `limit` bytes; r > min(in, out) is fine when it fits (as in PEFT)."""
    F.manual_seed(0)
    model = nn.Module()
    model.layer = nn.Embedding(HIDDEN, out, dtype=np.float32) if embed else nn.Linear(HIDDEN, out, dtype=np.float32)
    config = resolve_config(LoraConfig(r=r, target_modules=["layer"], use_dora=dora), model)
    needed = 4 * (r * HIDDEN + out * r + (out if dora else 0)) + 8 * r * max(HIDDEN, out)
    if needed <= limit:
        check_adapter_memory(plan_adapter(config, model), config, limit=limit)
    else:
        with pytest.raises(ValueError, match=rf"rank {r} on 1 layers needs {needed:,d} bytes, more than the "
                                             rf"{limit:,d} bytes"):
            check_adapter_memory(plan_adapter(config, model), config, limit=limit)


# -- adapter files that disagree with themselves ------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    lm = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lm.save_pretrained(tmp_path)
    return tmp_path


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("changes,key,shape", [
    (dict(r=10**9), "q_proj.lora_A.weight", (10**9, HIDDEN)),
    (dict(r=8), "q_proj.lora_A.weight", (8, HIDDEN)),
    (dict(rank_pattern={"v_proj": 10**12}), "v_proj.lora_A.weight", (10**12, HIDDEN)),
])
def test_a_config_rank_that_disagrees_with_the_weights_is_refused_before_allocating(saved, changes, key, shape):
    _edit_config(saved, **changes)
    file_key = f"base_model.model.model.layers.0.self_attn.{key}"
    match = rf"adapter_model\.safetensors: {file_key}: file shape \(2, {HIDDEN}\) != model shape \({shape[0]}, {HIDDEN}\)"
    model = _llama()
    msg = _refused_quickly_and_small(lambda: LoraModel.from_pretrained(model, saved), match)
    assert "adapter_config.json" in msg
    lm = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    _refused_quickly_and_small(lambda: lm.load_adapter(saved, "other"), match)
    assert list(lm.peft_config) == ["default"] and "other" not in lm.model.model.layers[0].self_attn.q_proj.r


# -- bad regexes and bad config values -----------------------------------------------------------------
@pytest.mark.parametrize("kw,field", [
    (dict(target_modules="(q_proj"), "target_modules"),
    (dict(target_modules=["q_proj"], exclude_modules="[v"), "exclude_modules"),
    (dict(rank_pattern={"q_proj(": 4}), "rank_pattern"),
    (dict(alpha_pattern={"*": 4}), "alpha_pattern"),
    (dict(modules_to_save=["lm_head)"]), "modules_to_save"),
    (dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers["), "layers_pattern"),
])
def test_an_invalid_regex_names_its_field_in_the_api_and_in_a_file(kw, field, saved):
    with pytest.raises(ValueError, match=rf"LoraConfig\.{field}.*not a valid regular expression"):
        LoraConfig(**kw)
    _edit_config(saved, **kw)
    with pytest.raises(ValueError, match=rf"adapter_config\.json: LoraConfig\.{field}.*not a valid regular expression"):
        LoraModel.from_pretrained(_llama(), saved)


@pytest.mark.parametrize("kw,field", [
    (dict(lora_alpha=0), "lora_alpha"), (dict(lora_alpha=-0.0), "lora_alpha"), (dict(lora_alpha=float("inf")), "lora_alpha"),
    (dict(alpha_pattern={"q_proj": 0}), "alpha_pattern"), (dict(alpha_pattern={"q_proj": float("nan")}), "alpha_pattern"), (dict(r=True), "r"), (dict(r="8"), "r"),
    (dict(lora_dropout=float("nan")), "lora_dropout"), (dict(task_type=5), "task_type"),
    (dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern=3), "layers_pattern"),
])
def test_nonsense_values_name_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"LoraConfig\.{field}:"):
        LoraConfig(**kw)


@given(r=st.one_of(st.integers(-3, 64), st.integers(10**12, 10**15), st.floats(allow_nan=True), st.booleans(),
                   st.none()),
       alpha=st.one_of(st.integers(-3, 64), st.floats(allow_nan=True, allow_infinity=True)),
       dropout=st.floats(-1, 2) | st.just(float("nan")))
def test_numeric_fields_either_refused_naming_the_field_or_used(r, alpha, dropout):
    """r, lora_alpha, lora_dropout: a ValueError naming the field, or an adapter with exactly those values."""
    try:
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["q_proj"])
    except ValueError as e:
        ok_r = isinstance(r, int) and not isinstance(r, bool) and r > 0
        ok_alpha = not isinstance(alpha, bool) and math.isfinite(alpha) and alpha != 0
        ok_dropout = 0 <= dropout < 1
        assert not (ok_r and ok_alpha and ok_dropout)
        field = "r" if not ok_r else "lora_alpha" if not ok_alpha else "lora_dropout"
        assert str(e).startswith(f"LoraConfig.{field}:"), str(e)
        return
    try:
        lm = get_peft_model(_llama(), config)
    except ValueError as e:  # only a rank too large for memory
        assert r >= 10**12 and "needs" in str(e) and f"rank {r}" in str(e)
        return
    layer = lm.model.model.layers[0].self_attn.q_proj
    assert layer.r["default"] == r and layer.scaling["default"] == alpha / r
    assert layer.lora_A["default"].weight.shape == (r, HIDDEN) and layer.lora_dropout["default"].p == dropout


# -- damaged adapter folders ----------------------------------------------------------------------
def _nested(depth):
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("text,match", [
    ("[1, 2]", "expected a JSON object, got a JSON list"),
    ('{"r": ' + _nested(100_000) + "}", "not valid JSON"),
    ('{"r": ' + "9" * 5000 + "}", "not valid JSON"),
    ('{"peft_type": "IA3"}', "peft_type is 'IA3'"),
    ('{"peft_type": ["LORA"]}', r"peft_type is \['LORA'\]"),
    ('{"r": "8"}', r"LoraConfig\.r:"),
    ('{"target_modules": 5}', r"LoraConfig\.target_modules:"),
    ('{"bias": [1]}', r"LoraConfig\.bias:"),
    ('{"lora_alpha": null}', r"LoraConfig\.lora_alpha:"),
    ('{"rank_pattern": [1]}', r"LoraConfig\.rank_pattern:"),
    ('{"use_dora": "yes"}', r"LoraConfig\.use_dora:"),
    ('{"layers_to_transform": {"a": 1}}', r"LoraConfig\.layers_to_transform:"),
    ('{"target_modules": ' + _nested(900) + "}", r"LoraConfig\.target_modules: .*got \[\[\[\[\.\.\.\]\]\]\]"),
    ('{"loftq_config": ' + _nested(900) + "}", r"loftq_config=\[\[\[\[\.\.\.\]\]\]\] asks for a PEFT feature"),
    ('{"target_modules": "' + "(" * 100_000 + '"}', r"LoraConfig\.target_modules: not a valid regular expression"),
    ('{"r": [' + "1," * 100_000 + "1]}", r"LoraConfig\.r: must be a positive integer, got \[1, 1, 1, 1, 1, 1, 1, 1, \.\.\.\]"),
], ids=lambda v: v[:40])
def test_a_damaged_config_names_the_file_and_key(saved, text, match):
    """NotImplementedError for a PEFT feature lora_np lacks, else ValueError; the message is one line
    of bounded length however large the value in the file."""
    (saved / "adapter_config.json").write_text(text)
    with pytest.raises((ValueError, NotImplementedError), match=match) as e:
        LoraModel.from_pretrained(_llama(), saved)
    msg = str(e.value)
    assert str(saved / "adapter_config.json") in msg and "\n" not in msg and len(msg) < 600 + len(str(saved)), msg


def test_missing_or_mismatched_weights_name_the_file_and_keys(saved):
    weights = saved / "adapter_model.safetensors"
    tensors = dict(lora_np.safetensors.load_file(weights))
    tensors = {k.replace("q_proj", "k_proj"): np.array(v) for k, v in tensors.items()}
    lora_np.safetensors.save_file(tensors, weights)
    with pytest.raises(ValueError, match=rf"{weights}: adapter does not fit this model: missing keys "
                                         r"\['base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight'.*"
                                         r"unexpected keys \[.*k_proj"):
        LoraModel.from_pretrained(_llama(), saved)
    os.remove(weights)
    with pytest.raises(FileNotFoundError, match=f"{weights}: no adapter weights"):
        LoraModel.from_pretrained(_llama(), saved)
    lm = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(FileNotFoundError, match=f"{weights}"):
        lm.load_adapter(saved, "other")
    assert list(lm.peft_config) == ["default"]


def test_non_finite_weights_are_refused_naming_the_file_and_key(saved):
    weights = saved / "adapter_model.safetensors"
    tensors = {k: np.array(v) for k, v in lora_np.safetensors.load_file(weights).items()}
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    tensors[key][1, 0] = np.nan
    lora_np.safetensors.save_file(tensors, weights)
    with pytest.raises(ValueError, match=rf"{weights}: {key}: holds non-finite values"):
        LoraModel.from_pretrained(_llama(), saved)


# -- a full disk while saving -------------------------------------------------------------------------
@pytest.mark.parametrize("fail_on", [1, 2])  # the weights file's fsync, then the config's
def test_a_full_disk_names_the_file_and_keeps_the_previous_adapter(tmp_path, monkeypatch, fail_on):
    import errno

    lm = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lm.save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    lm.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.data += 1.0
    lm.peft_config["default"].lora_dropout = 0.5
    calls = []
    real_fsync = os.fsync

    def full_disk(fd):
        calls.append(fd)
        if len(calls) == fail_on:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    name = ["adapter_model.safetensors", "adapter_config.json"][fail_on - 1]
    with pytest.raises(OSError, match=rf"No space left on device: '{tmp_path / name}'") as e:
        lm.save_pretrained(tmp_path)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / name)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == sorted(before)  # no temporary file left behind
    assert (tmp_path / name).read_bytes() == before[name]  # the file being written is the previous one


# -- other entry points taking names and numbers ------------------------------------------------------
def _two_adapters():
    lm = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lm.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    return lm


@pytest.mark.parametrize("kw,match", [
    (dict(adapters="default", weights=[1.0]), r"adapters: expected a list of adapter names, got str"),
    (dict(adapters=["default", "nope"], weights=[1.0, 1.0]), r"unknown adapter\(s\) \['nope'\]"),
    (dict(adapters=["default"], weights=1.0), "need a list of as many weights"),
    (dict(adapters=["default", "other"], weights=[1.0]), "need a list of as many weights"),
    (dict(adapters=["default"], weights=[float("nan")]), r"weights\[0\] must be a finite number"),
    (dict(adapters=["default"], weights=["1"]), r"weights\[0\] must be a finite number"),
    (dict(adapters=["default", "other"], weights=[1, 1], svd_rank=0), "svd_rank must be an integer >= 1"),
    (dict(adapters=["default", "other"], weights=[1, 1], svd_clamp=2), "svd_clamp must be a finite number"),
])
def test_add_weighted_adapter_refuses_nonsense_naming_the_argument(kw, match):
    lm = _two_adapters()
    with pytest.raises(ValueError, match=match):
        lm.add_weighted_adapter(adapter_name="mix", **kw)
    assert list(lm.peft_config) == ["default", "other"]
    assert "mix" not in lm.model.model.layers[0].self_attn.q_proj.r


def test_merge_adapter_refuses_a_string_or_an_unknown_name():
    """A string used to be iterated letter by letter: nothing merged, no error."""
    lm = _two_adapters()
    w = lm.model.model.layers[0].self_attn.q_proj.weight.data.copy()
    with pytest.raises(ValueError, match="merge_adapter: adapter_names: expected a list of adapter names"):
        lm.merge_adapter(adapter_names="other")
    with pytest.raises(ValueError, match=r"merge_adapter: unknown adapter\(s\) \['nope'\]"):
        lm.merge_adapter(adapter_names=["other", "nope"])
    assert np.array_equal(lm.model.model.layers[0].self_attn.q_proj.weight.data, w)
    lm.merge_adapter(adapter_names=["other"])
    assert lm.model.model.layers[0].self_attn.q_proj.merged_adapters == ["other"]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_refuse_a_rank_beyond_the_decomposition(init):
    """SVD / QR of a 16x16 weight has 16 components; r=17 would give factors of 16, not 17, rows."""
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}' needs r <= min\(in_features, out_features\) "
                                         r"= 16, got r=17"):
        get_peft_model(_llama(), LoraConfig(r=17, target_modules=["q_proj"], init_lora_weights=init))
    lm = get_peft_model(_llama(), LoraConfig(r=16, target_modules=["q_proj"], init_lora_weights=init))
    assert lm.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape == (16, HIDDEN)


def test_available_memory_is_capped_by_a_container_limit(monkeypatch):
    from lora_np.lora import model as lora_model

    files = {"/sys/fs/cgroup/memory.max": 10 << 30, "/sys/fs/cgroup/memory.current": 9 << 30}
    monkeypatch.setattr(lora_model, "_meminfo_available", lambda: 20 << 30)
    monkeypatch.setattr(lora_model, "_read_int", files.get)
    assert lora_model.available_memory() == 1 << 30
    files["/sys/fs/cgroup/memory.current"] = 11 << 30  # over the limit already: nothing left
    assert lora_model.available_memory() == 0
    files.clear()  # no cgroup limit ("max" reads as None)
    assert lora_model.available_memory() == 20 << 30
