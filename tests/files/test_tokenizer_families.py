"""lora_np.tokenizer for the SentencePiece-style and Qwen-style families, against Hugging Face `tokenizers`,
llama.cpp (llama-cpp-python) and transformers' GGUF tokenizer.

Properties: for any text, our ids equal the reference's ids (with and without BOS/EOS); for any ids, our
decode equals the reference's decode (with and without special tokens). The tokenizers are built here:
  - a BPE with <0xNN> byte tokens trained with `tokenizers` on a corpus of code, CJK, emoji, combining
    marks, white space runs and digits, written as tokenizer.json in the layouts of Llama 2 / TinyLlama /
    Phi-3 (Prepend + Replace normalizers), Mistral / transformers' LlamaTokenizer (Metaspace "first"),
    Gemma (Replace only), Metaspace "always" with split, without byte fallback (unk, fused or not) and
    with some byte tokens missing;
  - byte-level BPEs with Qwen2's NFC normalizer and Split regex, and with GPT-4o's (Phi-4-mini's) Split regex;
  - the SentencePiece vocabulary written as a GGUF "llama" tokenizer the way llama.cpp's converter writes it.
"""
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT, crosscheck
from lora_np import tokenizer_spm
from lora_np.tokenizer import PRE_TOKENIZERS, load_tokenizer

SPECIALS = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
# Phi-3's chat tokens take the white space after them (rstrip); one more takes the white space before it
# (lstrip), and one is matched in the normalized text (normalized).
ADDED = [("<|user|>", {"rstrip": True}), ("<|end|>", {"rstrip": True, "lstrip": True}),
         ("<|assistant|>", {"rstrip": True}), ("<extra_id>", {"normalized": True, "special": False})]

PIECES = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\x0b", "\x1c", "\x85", "\xa0", "\u2000", "\u3000",
          "\u2581", "\u2581\u2581", "'s", "'S", "0", "7", "12", "2024", "3.14", "²", "½", "a", "Hello", " world",
          "don't", "日本語", "中文", "한국어", "🤗", "👍🏽", "👨‍👩‍👧", "é", "e\u0301", "\u0301", "Å", "A\u030a",
          "\u1100\u1161\u11a8", "\u0898\u0316", "a\u1ac1\u0316", "\U00011935\U00011930", "ﬁ", "①",
          "def f(x):\n    return x", "<0x41>", "<0x", "<", ">", "|", "<s>", "</s>", "<unk>", "<|user|>", "<|end|>",
          "<|assistant|>", "<extra_id>", " <extra_id> ", "\ufeff", "\u200b"]
texts = st.lists(st.one_of(st.sampled_from(PIECES), st.characters(codec="utf-8")), max_size=40).map("".join)

CORPUS_LINES = [
    "def add(a, b):\n\treturn a + b  # sum\n\n\nclass A:\n    pass\n",
    "for (int i = 0; i < n; ++i) { x[i] += y[i] * 2.5e-3; }",
    "The quick brown fox jumps over the lazy dog. I'm, you're, he's, DON'T.",
    "日本語のテキストと中文文本，还有한국어. 東京 北京 서울",
    "emoji 🤗😀👍🏽 and 👨‍👩‍👧 family, café, naïve, e\u0301, Å ﬁ ①",
    "12345678901234567890 3.14159 1,000,000 ²³ ½",
    "   \t\t\n\n  \n    indented\n        more\n",
    "<|user|>\nhello<|end|>\n<|assistant|>\nhi there<|end|>",
]


def corpus():
    """The text the test tokenizers are checked against."""
    return CORPUS_LINES * 3 + [" ".join(PIECES)] * 2


def training_corpus():
    """The text they are trained on: the corpus and the lines of a Python file."""
    with open(os.path.join(ROOT, "lora_np", "tokenizer_spm.py"), encoding="utf-8") as fh:
        return corpus() + fh.read().splitlines()


# -- SentencePiece-style BPE in tokenizer.json -------------------------------------------

def _metaspace(scheme, split):
    return {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": scheme, "split": split}


NORMALIZER_PREPEND_REPLACE = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": "\u2581"},
    {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
DECODER_REPLACE = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
                   {"type": "Fuse"}]
DECODER_STRIP = {"type": "Sequence", "decoders": [*DECODER_REPLACE, {"type": "Strip", "content": " ", "start": 1,
                                                                     "stop": 0}]}
# name -> (normalizer, pre_tokenizer, decoder, byte_fallback, fuse_unk, merges as "a b" strings)
LAYOUTS = {
    "llama2": (NORMALIZER_PREPEND_REPLACE, None, DECODER_STRIP, True, True, False),
    "metaspace_first": (None, _metaspace("first", False), DECODER_STRIP, True, True, True),
    "gemma": ({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
              {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False},
              {"type": "Sequence", "decoders": DECODER_REPLACE}, True, True, True),
    "metaspace_always_split": (None, _metaspace("always", True), _metaspace("always", True), True, False, False),
    "metaspace_never_unk": (None, _metaspace("never", True), _metaspace("never", True), False, False, False),
    "unk_fused_nfkc": ({"type": "Sequence", "normalizers": [{"type": "NFKC"}, NORMALIZER_PREPEND_REPLACE]}, None,
                       DECODER_STRIP, False, True, False),
    # without the byte tokens <0xE0>..<0xEF> that start 3-byte characters: those become <unk>, others bytes
    "partial_bytes": (NORMALIZER_PREPEND_REPLACE, None, DECODER_STRIP, True, True, False),
}


@pytest.fixture(scope="module")
def spm_base():
    """A BPE over characters, trained by `tokenizers` without a pre-tokenizer (a line is one word, as in
    SentencePiece), with <unk> <s> </s> and the 256 byte tokens first and an alphabet of 150 characters,
    so that the rarer characters fall back to bytes: (vocab, merges)."""
    tokenizers = crosscheck("tokenizers")
    from tokenizers import models, normalizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=SPECIALS + BYTES, limit_alphabet=150,
                                  show_progress=False)
    tok.train_from_iterator(training_corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], model["merges"]


def spm_json(vocab, merges, layout):
    """tokenizer.json for `layout` of LAYOUTS."""
    normalizer, pre, decoder, byte_fallback, fuse_unk, string_merges = LAYOUTS[layout]
    if layout == "partial_bytes":
        vocab = {t: i for i, t in enumerate(t for t in sorted(vocab, key=vocab.get) if not t.startswith("<0xE"))}
    added = [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t in SPECIALS]
    for k, (content, flags) in enumerate(ADDED):
        added.append({"id": vocab.get(content, len(vocab) + k), "content": content, "single_word": False,
                      "lstrip": False, "rstrip": False, "normalized": False, "special": True, **flags})
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [vocab["<s>"]], "tokens": ["<s>"]}}},
        "decoder": decoder,
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": fuse_unk, "byte_fallback": byte_fallback,
                  "ignore_merges": False, "vocab": vocab,
                  "merges": [" ".join(m) for m in merges] if string_merges else merges},
    }


@pytest.fixture(scope="module")
def spm(spm_base, tmp_path_factory):
    """{layout: (tokenizers.Tokenizer, ours)} for every layout."""
    tokenizers = crosscheck("tokenizers")
    out = {}
    for layout in LAYOUTS:
        path = tmp_path_factory.mktemp(layout) / "tokenizer.json"
        path.write_text(json.dumps(spm_json(*spm_base, layout)), encoding="utf-8")
        out[layout] = tokenizers.Tokenizer.from_file(str(path)), load_tokenizer(path)
    return out


def check_same(ref, ours, text):
    """Our ids and decode equal `tokenizers`' for this text."""
    ids = ref.encode(text).ids
    assert ours.encode(text) == ids, text
    assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False).ids, text
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False), ids
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), ids


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_spm_corpus_matches_tokenizers(spm, layout):
    ref, ours = spm[layout]
    for text in corpus() + ["", " ", "  lead", "trail  ", "<s>", " <s> x", "<|user|>  hi  <|end|>  \n<|assistant|>",
                            "x <extra_id> y", "<extra_id>", "\u2581x", "\u9f98\U0001f99ex \u9f98\u9f98"]:
        check_same(ref, ours, text)


@settings(max_examples=60, deadline=None)
@given(text=texts)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_spm_random_text_matches_tokenizers(spm, layout, text):
    check_same(*spm[layout], text)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("layout", ["llama2", "metaspace_always_split", "metaspace_never_unk"])
def test_spm_decode_any_ids_matches_tokenizers(spm, layout, data):
    """Any ids, byte tokens that are not UTF-8 and special tokens included."""
    ref, ours = spm[layout]
    ids = data.draw(st.lists(st.integers(0, ours.vocab_size - 1), max_size=30))
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), ids


def test_spm_round_trip(spm):
    """decode(encode(text)) gives the text back, as it does in `tokenizers`, with byte fallback."""
    ref, ours = spm["llama2"]
    for text in corpus():
        expected = ref.decode(ref.encode(text).ids, skip_special_tokens=False)
        assert ours.decode(ours.encode(text)) == expected
        if "<|" not in text:  # the chat tokens strip the white space around them
            assert ours.decode(ours.encode(text), skip_special_tokens=True) == text


def test_spm_vocabulary_matches_tokenizers(spm):
    ref, ours = spm["llama2"]
    assert ours.get_vocab() == ref.get_vocab(with_added_tokens=True)
    assert ours.vocab_size == ref.get_vocab_size(with_added_tokens=True)


# -- pieces against tokenizers' own ------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(text=texts, form=st.sampled_from(["NFC", "NFD", "NFKC", "NFKD"]))
def test_unicode_normalizers_match_tokenizers(text, form):
    """Our normalizers equal tokenizers' (an older Unicode), also on marks Python 3.11 knows and it does not."""
    normalizers = crosscheck("tokenizers").normalizers
    assert tokenizer_spm.normalizer({"type": form}, "test")(text) == getattr(normalizers, form)().normalize_str(text)


def test_unicode_normalizers_match_tokenizers_on_every_code_point():
    normalizers = crosscheck("tokenizers").normalizers
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    text = "".join(c + "\u0316" + "a" for c in chars)  # each after a base, before a mark of class 220
    for form in ("NFC", "NFKD"):
        ours, theirs = tokenizer_spm.normalizer({"type": form}, "test")(text), getattr(normalizers, form)()
        assert ours == theirs.normalize_str(text), form


@settings(max_examples=100, deadline=None)
@given(text=texts, behavior=st.sampled_from(["removed", "isolated", "merged_with_previous", "merged_with_next",
                                             "contiguous"]),
       invert=st.booleans(), pattern=st.sampled_from([" ", "\u2581", r"\s+", r"\p{N}", r"<[^>]*>"]))
def test_split_behaviors_match_tokenizers(text, behavior, invert, pattern):
    tokenizers = crosscheck("tokenizers")
    from lora_np import tokenizer

    regex = pattern in (" ", "\u2581")
    theirs = tokenizers.pre_tokenizers.Split(pattern if regex else tokenizers.Regex(pattern), behavior, invert)
    name = "".join(w.capitalize() for w in behavior.split("_")).replace("Mergedwith", "MergedWith")
    spec = {"type": "Split", "pattern": {"String": pattern} if regex else {"Regex": pattern}, "behavior": name,
            "invert": invert}
    ((_, split),) = tokenizer._pre_tokenizer_steps(spec, "test")
    assert split(text) == [piece for piece, _ in theirs.pre_tokenize_str(text)]


# -- byte-level BPE with a Split regex: Qwen2 (after NFC), GPT-4o's o200k (Phi-4-mini) --------

@pytest.fixture(scope="module", params=["qwen2", "gpt4o"])
def split_byte_level(request, tmp_path_factory):
    """A byte-level BPE trained with Qwen2's tokenizer.json layout (NFC, its Split regex, ByteLevel without
    regex) or Phi-4-mini's (the o200k Split regex, ByteLevel): (tokenizers.Tokenizer, ours)."""
    tokenizers = crosscheck("tokenizers")
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    name = request.param
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC() if name == "qwen2" else None
    pattern = PRE_TOKENIZERS[name]["pretokenizers"][0]["pattern"]["Regex"]
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False)
    tok.train_from_iterator(training_corpus(), trainer)
    path = tmp_path_factory.mktemp(name) / "tokenizer.json"
    path.write_text(tok.to_str(), encoding="utf-8")
    return tokenizers.Tokenizer.from_file(str(path)), load_tokenizer(path)


def test_split_byte_level_corpus_matches_tokenizers(split_byte_level):
    for text in corpus() + ["<|im_start|>user\nhi<|im_end|>\n", "a\u030a \u212b \u0898\u0316 1234567",
                            "HelloWorld CamelCase ABCdef I'M x'S \u1c89\u1c8a \U00010d50\U00010d70 a\u0897b"]:
        check_same(*split_byte_level, text)


@settings(max_examples=100, deadline=None)
@given(text=texts)
def test_split_byte_level_random_text_matches_tokenizers(split_byte_level, text):
    check_same(*split_byte_level, text)


# -- GGUF "llama": llama.cpp's SentencePiece --------------------------------------------

def write_spm_gguf(path, vocab, extra, add_space_prefix=None, add_bos=None, add_eos=None, name=None):
    """The vocabulary as llama.cpp's converter writes a SentencePiece one (_create_vocab_sentencepiece):
    tokens by id, score -id for normal tokens and 0 for the others, token types (unknown, control, byte,
    user-defined), the special ids and flags."""
    gguf = crosscheck("gguf")
    tokens = sorted(vocab, key=vocab.get) + [t for t, _ in extra]
    types = []
    for i, t in enumerate(tokens):
        kind = dict(extra).get(t, gguf.TokenType.NORMAL)
        kind = {"<unk>": gguf.TokenType.UNKNOWN, "<s>": gguf.TokenType.CONTROL,
                "</s>": gguf.TokenType.CONTROL}.get(t, gguf.TokenType.BYTE if t in BYTES else kind)
        types.append(kind)
    scores = [-float(i) if kind == gguf.TokenType.NORMAL else 0.0 for i, kind in enumerate(types)]
    writer = gguf.GGUFWriter(str(path), "llama")
    if name is not None:
        writer.add_name(name)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(vocab["<s>"])
    writer.add_eos_token_id(vocab["</s>"])
    writer.add_unk_token_id(vocab["<unk>"])
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if add_eos is not None:
        writer.add_add_eos_token(add_eos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


GGUF_VARIANTS = {  # name -> (add_space_prefix, add_bos, add_eos, general.name)
    "default": (None, None, None, None),
    "gemma_like": (False, True, False, "gemma-2-2b-it"),
    "eos": (True, False, True, None),
    "phi3": (None, None, None, "Phi-3-mini-4k-instruct"),  # special tokens take the white space after them
}


@pytest.fixture(scope="module")
def spm_gguf(spm_base, tmp_path_factory):
    """{variant: (path, llama_cpp.Llama with the vocabulary only, ours)}."""
    crosscheck("gguf")
    llama_cpp = crosscheck("llama_cpp")
    vocab, _ = spm_base
    extra = [("<|user|>", 3), ("<|end|>", 3), ("<|endoftext|>", 3), ("<think>", 4)]
    out = {}
    for name, flags in GGUF_VARIANTS.items():
        path = write_spm_gguf(tmp_path_factory.mktemp(name) / "spm.gguf", vocab, extra, *flags)
        ref = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        out[name] = path, ref, load_tokenizer(path)
    return out


def check_llama_cpp(ref, ours, text):
    data = text.encode("utf-8")
    assert ours.encode(text) == ref.tokenize(data, add_bos=True, special=True), text
    assert ours.encode(text, add_special_tokens=False) == ref.tokenize(data, add_bos=False, special=True), text


@pytest.mark.parametrize("variant", list(GGUF_VARIANTS))
def test_spm_gguf_corpus_matches_llama_cpp(spm_gguf, variant):
    _, ref, ours = spm_gguf[variant]
    for text in corpus() + ["", " ", "  lead", "<s>", "</s>x", "<unk> y", "<|user|>hi<|end|> <think>x", "<0x41>",
                            "<|end|> \t\n\x0b\x0c\r\u3000\xa0x", "<s> x</s> \n"]:
        check_llama_cpp(ref, ours, text)


@settings(max_examples=60, deadline=None)
@given(text=texts.map(lambda t: t.replace("\x00", "")))  # llama.cpp stops at a NUL
@pytest.mark.parametrize("variant", list(GGUF_VARIANTS))
def test_spm_gguf_random_text_matches_llama_cpp(spm_gguf, variant, text):
    _, ref, ours = spm_gguf[variant]
    check_llama_cpp(ref, ours, text)


@pytest.fixture(scope="module")
def spm_gguf_transformers(spm_gguf):
    """transformers' tokenizers from the GGUFs: from the default one built as for Phi-3 (a Prepend normalizer:
    llama.cpp's space prefix after every special token) and as for Llama (Metaspace "first"); from the one
    without add_space_prefix built as for Gemma."""
    crosscheck("transformers")
    from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping

    built, configs = {}, {}
    for name, variant, builder in (("phi3", "default", mapping.phi3_tokenizer),
                                   ("llama", "default", mapping.sentencepiece_tokenizer),
                                   ("gemma", "gemma_like", mapping.gemma_tokenizer)):
        _, tokenizer_dict, configs[name] = mapping.get_gguf_tokenizer(str(spm_gguf[variant][0]))
        built[name] = mapping.add_gguf_special_tokens(builder(tokenizer_dict), tokenizer_dict).backend_tokenizer
    return built, configs


@settings(max_examples=100, deadline=None)
@given(text=texts)
def test_spm_gguf_matches_transformers(spm_gguf, spm_gguf_transformers, text):
    """Ids as transformers' GGUF tokenizer with Phi-3's normalizer (llama.cpp's layout); with Llama's Metaspace
    "first" wherever the two layouts agree: text that does not start with " " or "▁" and has no special
    tokens. Decode as transformers' LlamaTokenizer decodes."""
    _, _, ours = spm_gguf["default"]
    built, configs = spm_gguf_transformers
    assert configs["phi3"]["add_bos_token"] is True  # llama.cpp's default for a SentencePiece GGUF, as ours
    ids = built["phi3"].encode(text, add_special_tokens=False).ids
    assert ours.encode(text, add_special_tokens=False) == ids, text
    if not text.startswith((" ", "\u2581")) and "<" not in text:
        assert built["llama"].encode(text, add_special_tokens=False).ids == ids
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == built["llama"].decode(ids, skip_special_tokens=skip)


@settings(max_examples=100, deadline=None)
@given(text=texts)
def test_spm_gguf_without_space_prefix_matches_transformers_gemma(spm_gguf, spm_gguf_transformers, text):
    """A GGUF with add_space_prefix false (Gemma's): ids and decode as transformers' Gemma tokenizer."""
    _, _, ours = spm_gguf["gemma_like"]
    ref = spm_gguf_transformers[0]["gemma"]
    ids = ref.encode(text, add_special_tokens=False).ids
    assert ours.encode(text, add_special_tokens=False) == ids, text
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_spm_gguf_special_tokens(spm_gguf):
    path, _, ours = spm_gguf["default"]
    assert (ours.bos_token, ours.eos_token, ours.unk_token) == ("<s>", "</s>", "<unk>")
    assert ours.prefix_ids == [ours.token_to_id("<s>")] and ours.suffix_ids == []
    assert spm_gguf["eos"][2].prefix_ids == [] and spm_gguf["eos"][2].suffix_ids == [ours.token_to_id("</s>")]
    with pytest.raises(ValueError, match="SentencePiece.*no pre-tokenizer"):
        load_tokenizer(path, pre_tokenizer="gpt2")


# -- errors ------------------------------------------------------------------------------

def test_unsupported_parts_are_named(spm_base, tmp_path):
    def refused(edit, message, error=NotImplementedError):
        data = spm_json(*spm_base, "llama2")
        edit(data)
        path = tmp_path / "tokenizer.json"
        path.write_text(json.dumps(data), encoding="utf-8")
        with pytest.raises(error, match=message):
            load_tokenizer(path)

    refused(lambda d: d.update(normalizer={"type": "Lowercase"}), r"tokenizer\.json: normalizer 'Lowercase'")
    refused(lambda d: d.update(normalizer={"type": "Replace", "pattern": {"Regex": " +"}, "content": "x"}),
            r"Replace with pattern \{'Regex'")
    refused(lambda d: d.update(decoder={"type": "CTC"}), r"tokenizer\.json: decoder 'CTC'")
    refused(lambda d: d.update(pre_tokenizer={"type": "Whitespace"}), r"pre_tokenizer 'Whitespace'")
    refused(lambda d: d["added_tokens"][0].update(single_word=True), r"added token '<unk>' uses single_word")
    refused(lambda d: d["model"].update(continuing_subword_prefix="##"), r"model\.continuing_subword_prefix")
    refused(lambda d: d.update(pre_tokenizer=_metaspace("sometimes", True)), "prepend_scheme 'sometimes'", ValueError)
    refused(lambda d: d.update(pre_tokenizer={"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": False}),
            "add_prefix_space false does not match prepend_scheme 'always'", ValueError)  # as tokenizers refuses it
    refused(lambda d: d["model"].update(byte_fallback="yes"), "model.byte_fallback must be true or false", ValueError)


def test_gguf_unknown_tokenizer_model_is_named(tmp_path):
    gguf = crosscheck("gguf")
    path = tmp_path / "t5.gguf"
    writer = gguf.GGUFWriter(str(path), "t5")
    writer.add_tokenizer_model("t5")
    writer.add_token_list(["<pad>", "</s>", "<unk>"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(NotImplementedError, match=r"t5\.gguf: tokenizer\.ggml\.model 't5' is not supported"):
        load_tokenizer(path)


def test_gguf_missing_byte_token_is_named(spm_base, tmp_path):
    """A character with no token and no byte token has no ids in llama.cpp (byte_to_token throws); the error
    names the byte."""
    vocab, _ = spm_base
    kept = {t: i for t, i in vocab.items() if t != "<0xE2>"}
    kept = {t: k for k, t in enumerate(sorted(kept, key=kept.get))}
    ours = load_tokenizer(write_spm_gguf(tmp_path / "nobyte.gguf", kept, []))
    assert "\u20ac" not in kept  # €, UTF-8 e2 82 ac
    with pytest.raises(ValueError, match=r"nobyte\.gguf: no token for .*<0xE2>"):
        ours.encode("price: 5\u20ac")


# -- GGUF "gpt2" with the Qwen2 and GPT-4o pre-tokenizers --------------------------------

@pytest.fixture(scope="module")
def split_byte_level_gguf(split_byte_level, tmp_path_factory):
    """The byte-level BPE written as llama.cpp's converter writes it (tokens, types, merges, the pre-tokenizer
    name): (transformers' tokenizer from the GGUF, ours from the GGUF)."""
    gguf = crosscheck("gguf")
    crosscheck("transformers")
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    ref, _ = split_byte_level
    pre = "qwen2" if ref.normalizer is not None else "gpt-4o"
    vocab = ref.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    path = tmp_path_factory.mktemp(pre) / "tok.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) for m in json.loads(ref.to_str())["model"]["merges"]])
    writer.add_eos_token_id(vocab["<|endoftext|>"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    architecture, tokenizer_dict, _ = get_gguf_tokenizer(str(path))
    return convert_gguf_tokenizer(architecture, tokenizer_dict)[0], load_tokenizer(path)


@settings(max_examples=60, deadline=None)
@given(text=texts)
def test_split_byte_level_gguf_matches_transformers(split_byte_level_gguf, text):
    """llama.cpp runs no NFC for "qwen2", and neither does transformers' GGUF tokenizer."""
    ref, ours = split_byte_level_gguf
    ids = ref.encode(text, add_special_tokens=False).ids
    assert ours.encode(text) == ids, text
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False)
