"""BPE tokenizers exact to Hugging Face `tokenizers` (byte-level: GPT-2, Llama 3, SmolLM, Qwen2/3;
SentencePiece-style: Llama 2, TinyLlama, Mistral, Phi-3, Gemma) and llama.cpp's SentencePiece tokenizer for
GGUF "llama" vocabularies.

    tok = load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")   # or a tokenizer.json, or a HF folder
    ids = tok.encode("Hello world")                            # [19556, 905]
    tok.decode(ids)                                            # 'Hello world'
    tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)

Encoding goes the way `tokenizers` goes:
  1. added tokens that are not normalized (`<|im_start|>`, `<s>`...) are cut out of the text verbatim,
     leftmost-longest match first (lstrip / rstrip take the white space around them);
  2. each remaining segment is normalized (Prepend "▁", Replace " " by "▁", NFC...: tokenizer_spm.py), and
     normalized added tokens are cut out of it;
  3. each remaining piece is split by the pre-tokenizer: regex splits (the GPT-2, Llama 3 and Qwen2
     patterns, SmolLM's "every digit alone, then GPT-2"), Metaspace, or none;
  4. byte-level BPE: each piece becomes its UTF-8 bytes, one initial symbol per byte (GPT-2's byte <->
     unicode map names those symbols in the vocabulary); otherwise one symbol per character, a character
     missing from the vocabulary becoming its <0xNN> byte tokens (byte_fallback) or the unk token. BPE
     merges the adjacent pair of lowest rank, leftmost first, until no pair has a merge (a GGUF "llama"
     vocabulary instead merges the pair whose token scores highest: tokenizer_spm.spm_tokenize);
  5. the post-processor adds BOS/EOS when asked.
Decoding runs the decoder chain: ByteLevel, or Replace / ByteFallback / Fuse / Strip / Metaspace.

The regexes are Oniguruma's (as in tokenizer.json and llama.cpp). They are run with Python's
`re` after `\\p{L}`, `\\p{N}` and `\\s` are replaced by explicit code point classes built from
`unicodedata` (plus the letters and numbers of Unicode 15-16, which Oniguruma knows and Python 3.11
does not): Python's `\\s` also matches \\x1c-\\x1f, Oniguruma's is Unicode White_Space.

A GGUF file names its pre-tokenizer in `tokenizer.ggml.pre`; we read that name as llama.cpp
does (llama-vocab.cpp). For "smollm" that is "every digit alone, then GPT-2", as in SmolLM2's
own tokenizer.json. transformers (5.x) builds a plain GPT-2 ByteLevel pre-tokenizer for
"smollm" instead; the two differ when whitespace or newlines precede a digit ("a   1",
"x\\n\\n2"). `load_tokenizer(path, pre_tokenizer="gpt2")` reproduces transformers.
A GGUF "llama" vocabulary is tokenized as llama.cpp does (ids equal to llama_cpp's tokenize with
special=True); transformers differs from it after special tokens and on leading white space.
"""
from __future__ import annotations

import heapq
import os
import re
import unicodedata
from functools import lru_cache

import numpy as np

from . import tokenizer_spm
from .chat_template import render_chat
from .fileio import read_json_object

__all__ = ["Tokenizer", "TokenizerError", "load_tokenizer", "bytes_to_unicode", "PRE_TOKENIZERS",
           "GGUF_PRE_TOKENIZERS"]

MAX_ID = 2**24 - 1  # no real vocabulary comes near; a larger id is a broken file


class TokenizerError(ValueError):
    """A tokenizer file that is malformed, or ids that are not in the vocabulary: the message names the file
    and the key, token or id."""


def _is_id(i):
    return isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= MAX_ID

# -- Unicode classes for Oniguruma patterns ----------------------------------------------

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Unicode White_Space: what Oniguruma's \s matches.
_WHITE_SPACE = ((0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680),
                (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000))


_CATEGORY_NAMES = ("Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Nd", "Nl", "No", "Pc", "Pd", "Ps", "Pe", "Pi",
                   "Pf", "Po", "Sm", "Sc", "Sk", "So", "Zs", "Zl", "Zp", "Cc", "Cf", "Cs", "Co", "Cn")


# Letters, marks and numbers assigned in Unicode 15.0-16.0, which tokenizers' Oniguruma (Unicode 16.0) knows and
# Python 3.11's unicodedata (14.0) calls unassigned, by general category (found by matching each \p{..}
# against every code point unassigned in Python). \p{L} takes those of every L. category, and so on.
_UNICODE_16_ADDITIONS = {
    "Lu": ((0x1C89, 0x1C89), (0xA7CB, 0xA7CC), (0xA7DA, 0xA7DA), (0xA7DC, 0xA7DC), (0x10D50, 0x10D65)),
    "Ll": ((0x1C8A, 0x1C8A), (0xA7CD, 0xA7CD), (0xA7DB, 0xA7DB), (0x10D70, 0x10D85), (0x1DF25, 0x1DF2A)),
    "Lm": ((0x10D4E, 0x10D4E), (0x10D6F, 0x10D6F), (0x16D40, 0x16D42), (0x16D6B, 0x16D6C), (0x1E030, 0x1E06D),
           (0x1E4EB, 0x1E4EB)),
    "Lo": ((0x105C0, 0x105F3), (0x10D4A, 0x10D4D), (0x10D4F, 0x10D4F), (0x10EC2, 0x10EC4), (0x1123F, 0x11240),
           (0x11380, 0x11389), (0x1138B, 0x1138B), (0x1138E, 0x1138E), (0x11390, 0x113B5), (0x113B7, 0x113B7),
           (0x113D1, 0x113D1), (0x113D3, 0x113D3), (0x11BC0, 0x11BE0), (0x11F02, 0x11F02), (0x11F04, 0x11F10),
           (0x11F12, 0x11F33), (0x1342F, 0x1342F), (0x13441, 0x13446), (0x13460, 0x143FA), (0x16100, 0x1611D),
           (0x16D43, 0x16D6A), (0x18CFF, 0x18CFF), (0x1B132, 0x1B132), (0x1B155, 0x1B155), (0x1E4D0, 0x1E4EA),
           (0x1E5D0, 0x1E5ED), (0x1E5F0, 0x1E5F0), (0x2B739, 0x2B739), (0x2EBF0, 0x2EE5D), (0x31350, 0x323AF)),
    "Mn": ((0x897, 0x897), (0xECE, 0xECE), (0x10D69, 0x10D6D), (0x10EFC, 0x10EFF), (0x11241, 0x11241),
           (0x113BB, 0x113C0), (0x113CE, 0x113CE), (0x113D0, 0x113D0), (0x113D2, 0x113D2), (0x113E1, 0x113E2),
           (0x11F00, 0x11F01), (0x11F36, 0x11F3A), (0x11F40, 0x11F40), (0x11F42, 0x11F42), (0x11F5A, 0x11F5A),
           (0x13440, 0x13440), (0x13447, 0x13455), (0x1611E, 0x16129), (0x1612D, 0x1612F), (0x1E08F, 0x1E08F),
           (0x1E4EC, 0x1E4EF), (0x1E5EE, 0x1E5EF)),
    "Mc": ((0xCF3, 0xCF3), (0x113B8, 0x113BA), (0x113C2, 0x113C2), (0x113C5, 0x113C5), (0x113C7, 0x113CA),
           (0x113CC, 0x113CD), (0x113CF, 0x113CF), (0x11F03, 0x11F03), (0x11F34, 0x11F35), (0x11F3E, 0x11F3F),
           (0x11F41, 0x11F41), (0x1612A, 0x1612C)),
    "Nd": ((0x10D40, 0x10D49), (0x116D0, 0x116E3), (0x11BF0, 0x11BF9), (0x11F50, 0x11F59), (0x16130, 0x16139),
           (0x16D70, 0x16D79), (0x1CCF0, 0x1CCF9), (0x1E4F0, 0x1E4F9), (0x1E5F1, 0x1E5FA)),
    "No": ((0x1D2C0, 0x1D2D3),),
}


# Numbers of Unicode 17.0 that tokenizers' Digits pre-tokenizer (Rust's char::is_numeric) splits off
# and Oniguruma's \p{N} does not know.
_RUST_NUMERIC_ADDITIONS = ((0x11DE0, 0x11DE9), (0x16FF4, 0x16FF6))


@lru_cache(maxsize=None)
def _categories():
    """One letter per code point, "a" + the index of its general category in _CATEGORY_NAMES."""
    letter = {name: chr(ord("a") + k) for k, name in enumerate(_CATEGORY_NAMES)}
    return "".join(map(letter.__getitem__, map(unicodedata.category, map(chr, range(0x110000)))))


@lru_cache(maxsize=None)
def _category_ranges(category):
    """Code point ranges of a general category ("L", "N", "Lu", ...)."""
    letters = "".join(chr(ord("a") + k) for k, name in enumerate(_CATEGORY_NAMES) if name.startswith(category))
    if not letters:
        raise ValueError(f"unknown Unicode general category \\p{{{category}}}")
    ranges = [(m.start(), m.end() - 1) for m in re.finditer(f"[{letters}]+", _categories())]
    ranges += [r for name, added in _UNICODE_16_ADDITIONS.items() if name.startswith(category) for r in added]
    return tuple(_merged(ranges))


def _merged(ranges):
    """Sorted, non-overlapping, non-adjacent inclusive ranges."""
    out = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _complement(ranges):
    out, start = [], 0
    for a, b in _merged(ranges):
        if a > start:
            out.append((start, a - 1))
        start = b + 1
    return out + [(start, 0x10FFFF)] if start <= 0x10FFFF else out


def _class(ranges):
    """A `re` class for the ranges. `re` tests characters above U+FFFF against a class by scanning its
    ranges one by one, so those go in a second class that only such characters reach."""
    def body(rs):
        return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in rs)
    bmp = [(a, min(b, 0xFFFF)) for a, b in ranges if a <= 0xFFFF]
    astral = [(max(a, 0x10000), b) for a, b in ranges if b > 0xFFFF]
    if not astral:
        return f"[{body(bmp)}]"
    return f"(?:[{body(bmp)}]|(?=[^\\x00-\\uffff])[{body(astral)}])" if bmp else f"[{body(astral)}]"


_ESCAPE = re.compile(r"\\(?:([pP])\{(\w+)\}|([sS])|(.))", re.S)
_SIMPLE_ESCAPES = {"r": "\r", "n": "\n", "t": "\t", "f": "\f", "v": "\v"}


def _escape_ranges(m):
    """Ranges of a \\p{..}, \\P{..}, \\s, \\S escape; None for any other escape."""
    p, category, space, _ = m.groups()
    if category:
        ranges = _category_ranges(category)
        return _complement(ranges) if p == "P" else ranges
    if space:
        return _complement(_WHITE_SPACE) if space == "S" else list(_WHITE_SPACE)
    return None


def _parse_class(pattern, i):
    """The ranges of the class `[...]` starting at pattern[i], and the index after it."""
    negated = pattern.startswith("[^", i)
    i += 2 if negated else 1
    ranges, first = [], True
    while True:
        if i >= len(pattern):
            raise ValueError(f"pattern {pattern!r}: unterminated [...]")
        c = pattern[i]
        if c == "]" and not first:
            break
        first = False
        if c == "[":
            raise ValueError(f"pattern {pattern!r}: nested character classes are not supported")
        if c == "\\":
            m = _ESCAPE.match(pattern, i)
            if m is None:
                raise ValueError(f"pattern {pattern!r} ends with a lone backslash")
            i = m.end()
            spelled = _escape_ranges(m)
            if spelled is not None:
                ranges += spelled
                continue
            other = m.group(4)
            if other.isalnum() and other not in _SIMPLE_ESCAPES:
                raise ValueError(f"pattern {pattern!r}: escape \\{other} inside [...] is not supported")
            c = _SIMPLE_ESCAPES.get(other, other)
        else:
            i += 1
        if pattern.startswith("-", i) and i + 1 < len(pattern) and pattern[i + 1] not in "]\\":
            ranges.append((ord(c), ord(pattern[i + 1])))
            i += 2
        else:
            ranges.append((ord(c), ord(c)))
    ranges = _merged(ranges)
    return (_complement(ranges) if negated else ranges), i + 1


def _translate(pattern):
    """An Oniguruma pattern as a Python `re` pattern, every character class spelled out in code points."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "[":
            ranges, i = _parse_class(pattern, i)
            out.append(_class(ranges))
        elif c == "\\":
            m = _ESCAPE.match(pattern, i)
            if m is None:
                raise ValueError(f"pattern {pattern!r} ends with a lone backslash")
            ranges = _escape_ranges(m)
            out.append(m.group() if ranges is None else _class(ranges))
            i = m.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


@lru_cache(maxsize=None)
def _compile(pattern):
    return re.compile(_translate(pattern))


# -- byte-level alphabet -----------------------------------------------------------------

@lru_cache(maxsize=None)
def bytes_to_unicode():
    """GPT-2's map from each byte to a printable character (`openai/gpt-2`, encoder.py)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


# -- pre-tokenizers ----------------------------------------------------------------------

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GPT-4o's o200k pattern (Phi-4-mini, Llama 4): words by letter case, marks inside words.
GPT4O_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_byte_level(pattern):
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
    ]}


# Named pre-tokenizers, written as tokenizer.json writes them.
PRE_TOKENIZERS = {
    "gpt2": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
    ]},
    "llama3": _split_then_byte_level(LLAMA3_PATTERN),
    "qwen2": _split_then_byte_level(QWEN2_PATTERN),
    "gpt4o": _split_then_byte_level(GPT4O_PATTERN),
}

# `tokenizer.ggml.pre` -> (named pre-tokenizer, ignore_merges, add BOS when the file has no
# tokenizer.ggml.add_bos_token), as llama.cpp's llama-vocab.cpp reads them.
GGUF_PRE_TOKENIZERS = {
    **dict.fromkeys(("gpt-2", "phi-2", "jina-es", "jina-de", "mpt", "olmo", "jais"), ("gpt2", False, False)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
                    ("smollm", False, False)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
                    ("llama3", True, True)),
    **dict.fromkeys(("dbrx", "smaug-bpe"), ("llama3", False, False)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2"), ("qwen2", False, False)),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie"), ("gpt4o", False, False)),
}

_SPLIT_BEHAVIORS = ("Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous")


def _regex_split(regex, behavior="Isolated", invert=False):
    """tokenizers' NormalizedString::split by a pattern: the text cut into the regex's matches and the gaps
    between them, the matches then removed, kept alone, glued to the piece before or after, or runs of them
    kept together (`behavior`); with `invert` the gaps play the matches' part."""
    if behavior == "Isolated":
        return _isolated_split(regex)

    def split(text):
        parts, pos = [], 0  # (start, end, is a match)
        for m in regex.finditer(text):
            if m.start() > pos:
                parts.append([pos, m.start(), invert])
            parts.append([m.start(), m.end(), not invert])
            pos = m.end()
        if pos < len(text):
            parts.append([pos, len(text), invert])
        if behavior == "Removed":
            return [text[a:b] for a, b, match in parts if not match and b > a]
        if behavior == "MergedWithNext":
            parts = [[len(text) - b, len(text) - a, match] for a, b, match in reversed(parts)]
        kept, previous = [], False
        for part in parts:
            merge = part[2] == previous if behavior == "Contiguous" else part[2] and not previous
            if merge and kept:
                kept[-1][1] = part[1]
            else:
                kept.append(part)
            previous = part[2]
        if behavior == "MergedWithNext":
            kept = [[len(text) - b, len(text) - a, match] for a, b, match in reversed(kept)]
        return [text[a:b] for a, b, _ in kept if b > a]
    split.removes = behavior == "Removed"  # then the first piece may not start where the text starts
    return split


def _isolated_split(regex):
    """Split text into the regex's matches and the gaps between them (tokenizers' "Isolated")."""
    def split(text):
        if not regex.groups:  # findall gives whole matches; if they cover the text there are no gaps
            pieces = regex.findall(text)
            if sum(map(len, pieces)) == len(text):
                return pieces
        pieces, pos = [], 0
        for m in regex.finditer(text):
            if m.start() > pos:
                pieces.append(text[pos:m.start()])
            if m.end() > m.start():
                pieces.append(m.group())
            pos = m.end()
        if pos < len(text):
            pieces.append(text[pos:])
        return pieces
    return split


def _prefix_space(text):
    return [text if text.startswith(" ") else " " + text]


def _pre_tokenizer_steps(spec, where):
    """A tokenizer.json pre_tokenizer as a list of steps, each a pair of `str -> list[str]` functions: the one
    for the piece at the start of the text, and the one for every other piece (they differ only for
    Metaspace's prepend_scheme "first"). A ByteLevel step is the pair (None, None); it must come last."""
    kind = spec.get("type") if spec else None
    if kind is None:
        return []
    if kind == "Sequence":
        return [s for sub in spec["pretokenizers"] for s in _pre_tokenizer_steps(sub, where)]
    if kind == "Metaspace":
        return [tokenizer_spm.metaspace(spec, where)]
    if kind == "ByteLevel":
        steps = [_prefix_space] if spec.get("add_prefix_space", True) else []
        if spec.get("use_regex", True):
            steps.append(_isolated_split(_compile(GPT2_PATTERN)))
        steps.append(None)  # the byte-level step
    elif kind == "Digits":
        numeric = _class(_merged([*_category_ranges("N"), *_RUST_NUMERIC_ADDITIONS]))
        steps = [_isolated_split(re.compile(numeric if spec.get("individual_digits", False) else numeric + "+"))]
    elif kind == "Split":
        pattern, behavior, invert = spec["pattern"], spec.get("behavior"), spec.get("invert", False)
        regex = _compile(pattern["Regex"]) if "Regex" in pattern else re.compile(re.escape(pattern["String"]))
        if behavior not in _SPLIT_BEHAVIORS or not isinstance(invert, bool):
            raise NotImplementedError(f"{where}: Split pre-tokenizer with behavior {behavior!r}, invert {invert!r} "
                                      f"(behavior one of {_SPLIT_BEHAVIORS}, invert true or false)")
        steps = [_regex_split(regex, behavior, invert)]
    else:
        raise NotImplementedError(f"{where}: pre_tokenizer {kind!r} is not supported (ByteLevel, Digits, Split, "
                                  "Metaspace, or a Sequence of them)")
    return [(s, s) for s in steps]


def _byte_level_decoder(tokens):
    """tokenizers' ByteLevel decoder: every token's bytes (a token outside the byte alphabet, an added token,
    gives its UTF-8), decoded as one string, U+FFFD for what is not UTF-8."""
    return [b"".join(map(_token_bytes, tokens)).decode("utf-8", errors="replace")]


@lru_cache(maxsize=1 << 18)
def _token_bytes(token):
    char_byte = _char_byte()
    return bytes(char_byte[c] for c in token) if all(c in char_byte for c in token) else token.encode("utf-8")


@lru_cache(maxsize=None)
def _char_byte():
    return {c: b for b, c in bytes_to_unicode().items()}


def _decoder_steps(spec, where):
    """A tokenizer.json decoder as a list of `list[str] -> list[str]` steps (None: tokens joined by spaces)."""
    kind = spec.get("type") if spec else None
    if kind is None:
        return None
    if kind == "Sequence":
        return [s for sub in spec["decoders"] for s in _decoder_steps(sub, where)]
    if kind == "ByteLevel":
        return [_byte_level_decoder]
    if kind in tokenizer_spm.DECODERS:
        return [tokenizer_spm.DECODERS[kind](spec, where)]
    raise NotImplementedError(f"{where}: decoder {kind!r} is not supported (ByteLevel, "
                              f"{', '.join(tokenizer_spm.DECODERS)}, or a Sequence of them)")


# -- the tokenizer -----------------------------------------------------------------------

def _check_vocab(vocab, merges, added_tokens, source):
    """TokenizerError naming the key unless: vocab maps str to distinct ids in [0, MAX_ID]; merges are pairs
    of str; added tokens are objects with such an id, non-empty str content, and an id that the vocabulary
    gives to no other string."""
    def fail(problem):
        raise TokenizerError(f"{source}: {problem}")

    if not isinstance(vocab, dict):
        fail(f"model.vocab must be an object of token: id, got a {type(vocab).__name__}")
    owner = {}
    for token, i in vocab.items():
        if not isinstance(token, str):
            fail(f"model.vocab: token {token!r} is not a string")
        if not _is_id(i):
            fail(f"model.vocab[{token!r}] = {i!r} is not an id (an integer in [0, {MAX_ID}])")
        if i in owner:
            fail(f"model.vocab: id {i} is given to both {owner[i]!r} and {token!r}")
        owner[i] = token
    if not isinstance(merges, (list, tuple)):
        fail(f"model.merges must be a list, got a {type(merges).__name__}")
    for rank, m in enumerate(merges):
        if not (isinstance(m, (list, tuple)) and len(m) == 2 and all(isinstance(x, str) for x in m)):
            fail(f"model.merges[{rank}] = {m!r} is not a pair of tokens")
    if not isinstance(added_tokens, (list, tuple)):
        fail(f"added_tokens must be a list, got a {type(added_tokens).__name__}")
    added = {}
    for k, t in enumerate(added_tokens):
        if not isinstance(t, dict) or "id" not in t or "content" not in t:
            fail(f"added_tokens[{k}] must be an object with 'id' and 'content', got {t!r:.80}")
        i, content = t["id"], t["content"]
        if not _is_id(i):
            fail(f"added_tokens[{k}]: id {i!r} is not an id (an integer in [0, {MAX_ID}])")
        if not isinstance(content, str) or not content:
            fail(f"added token id {i}: content {content!r} must be a non-empty string")
        if owner.get(i, content) != content or added.get(i, content) != content:
            fail(f"added token id {i} ({content!r}) is also the id of {owner.get(i, added.get(i))!r}")
        if vocab.get(content, i) != i:
            fail(f"added token {content!r} has id {i}, but model.vocab gives it {vocab[content]}")
        added[i] = content


@lru_cache(maxsize=None)
def _white_space():
    """Every Unicode White_Space character (Rust's char::is_whitespace, the regex crate's \\s)."""
    return "".join(chr(c) for a, b in _WHITE_SPACE for c in range(a, b + 1))


class Tokenizer:
    """A BPE tokenizer, as Hugging Face `tokenizers` runs one, or llama.cpp's SentencePiece tokenizer.
    Build it with `load_tokenizer`.

    vocab: token string -> id (byte-level BPE spells tokens in GPT-2's byte alphabet). merges: (left, right)
    pairs, best first. added_tokens: dicts as in tokenizer.json's "added_tokens" (id, content, special,
    normalized, lstrip, rstrip). normalizer, pre_tokenizer, decoder: tokenizer.json's dicts (a ByteLevel
    pre-tokenizer makes the BPE byte-level). byte_fallback, fuse_unk, ignore_merges, model_unk_token: the
    BPE model's options. scores: a score per id, for llama.cpp's SentencePiece merges instead of BPE merges
    (`merges` then empty). strip_space: the characters an lstrip / rstrip added token takes (default Unicode
    White_Space, as tokenizers; llama.cpp takes C's isspace). prefix_ids / suffix_ids: what
    `encode(..., add_special_tokens=True)` puts around the text.
    """

    _CACHE_SIZE = 100_000
    _CACHE_PIECE = 256  # longer pieces (a SentencePiece text between special tokens) are not kept

    def __init__(self, vocab, merges, added_tokens, pre_tokenizer, *, normalizer=None, decoder=None,
                 prefix_ids=(), suffix_ids=(), bos_token=None, eos_token=None, pad_token=None, unk_token=None,
                 model_unk_token=None, byte_fallback=False, fuse_unk=False, ignore_merges=False, scores=None,
                 strip_space=None, chat_template=None, source="tokenizer"):
        self.source = source
        _check_vocab(vocab, merges, added_tokens, source)
        self._model_vocab = dict(vocab)
        self._vocab = dict(vocab)
        for t in added_tokens:
            if t.get("single_word"):
                raise NotImplementedError(f"{source}: added token {t['content']!r} uses single_word")
            self._vocab.setdefault(t["content"], t["id"])
        self._normalize = _structured(source, "normalizer", tokenizer_spm.normalizer, normalizer, source)
        self._id_to_token = {i: s for s, i in self._vocab.items()}
        for t in added_tokens:
            self._id_to_token[t["id"]] = t["content"]
        self._special_contents = frozenset(t["content"] for t in added_tokens if t.get("special"))
        self._strip_space = _white_space() if strip_space is None else strip_space
        # What decode shows for an added token: its normalized form if it is matched normalized.
        self._decode_token = dict(self._id_to_token)
        # Non-normalized added tokens are cut out of the text first, normalized ones from the normalized text.
        self._added_matchers = []
        for normalized in (False, True):
            group = {}
            for t in added_tokens:
                if bool(t.get("normalized", True)) == normalized:
                    key = self._normalize(t["content"]) if normalized and self._normalize else t["content"]
                    self._decode_token[t["id"]] = key
                    if key:
                        group[key] = (t["id"], bool(t.get("lstrip")), bool(t.get("rstrip")))
            self._added_matchers.append((self._alternation(group), group))

        steps = _structured(source, "pre_tokenizer", _pre_tokenizer_steps, pre_tokenizer, f"{source}: pre_tokenizer")
        self._byte_level = (None, None) in steps
        if self._byte_level and steps.index((None, None)) != len(steps) - 1:
            raise NotImplementedError(f"{source}: pre_tokenizer must end with its ByteLevel, got {pre_tokenizer}")
        self._steps = [s for s in steps if s != (None, None)]
        for k, (lead, step) in enumerate(self._steps):
            if lead is not step and any(getattr(s, "removes", False) for _, s in self._steps[:k]):
                raise NotImplementedError(f"{source}: pre_tokenizer: a Split with behavior Removed before a "
                                          f"Metaspace with prepend_scheme 'first' is not supported")
        self._decoders = _structured(source, "decoder", _decoder_steps, decoder, source)
        self._byte_table = str.maketrans({chr(b): c for b, c in bytes_to_unicode().items()})

        self._unk_id = None if model_unk_token is None else self._require(model_unk_token, "model.unk_token")
        self._byte_fallback = [self._model_vocab.get(tokenizer_spm.byte_token(b)) for b in range(256)] \
            if byte_fallback else None
        self._fuse_unk = fuse_unk
        self._ignore_merges = ignore_merges
        if scores is not None and (merges or len(scores) != len(vocab)):
            raise TokenizerError(f"{source}: scores ({len(scores)}) must come with no merges and one per token "
                                 f"({len(vocab)})")
        self._scores = scores
        self._merges = {}  # left id << 32 | right id -> (rank, merged id)
        for rank, (a, b) in enumerate(merges):
            ids = (self._model_vocab.get(a), self._model_vocab.get(b), self._model_vocab.get(a + b))
            if None in ids:
                missing = [s for s, i in zip((a, b, a + b), ids) if i is None]
                raise TokenizerError(f"{source}: merge {rank} ({a!r} {b!r}) uses {missing!r}, not in the vocabulary")
            self._merges.setdefault(ids[0] << 32 | ids[1], (rank, ids[2]))
        self._cache = {}

        self.prefix_ids = [int(i) for i in prefix_ids]
        self.suffix_ids = [int(i) for i in suffix_ids]
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.bos_token_id = None if bos_token is None else self._require(bos_token, "bos_token")
        self.eos_token_id = None if eos_token is None else self._require(eos_token, "eos_token")
        self.pad_token_id = None if pad_token is None else self._require(pad_token, "pad_token")
        self.unk_token_id = None if unk_token is None else self._require(unk_token, "unk_token")
        self.chat_template = chat_template
        self._vocab_size = max(self._id_to_token) + 1

    @staticmethod
    def _alternation(tokens):
        if not tokens:
            return None
        return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))

    def _require(self, token, what):
        if token not in self._vocab:
            raise TokenizerError(f"{self.source}: {what} {token!r} is not in the vocabulary")
        return self._vocab[token]

    def __repr__(self):
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"

    # -- vocabulary --------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (`len()` of a transformers tokenizer)."""
        return self._vocab_size

    def __len__(self):
        return self.vocab_size

    def token_to_id(self, token):
        return self._vocab.get(token)

    def id_to_token(self, i):
        return self._id_to_token.get(int(i))

    def get_vocab(self):
        return dict(self._vocab)

    # -- encode ------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"{self.source}: encode() takes a str, got {type(text).__name__}")
        ids = []
        for segment, at_start, added_id in self._segments(text):
            if added_id is not None:
                ids.append(added_id)
                continue
            pieces = [segment]
            for lead, step in self._steps:
                rest = [p for piece in pieces[at_start:] for p in step(piece)]
                pieces = lead(pieces[0]) + rest if at_start and pieces else rest
            for piece in pieces:
                ids.extend(self._tokenize(piece))
        return self.prefix_ids + ids + self.suffix_ids if add_special_tokens else ids

    def _segments(self, text):
        """(text, at the start of the input, None) for the text to tokenize, normalized, and (None, False, id)
        for each added token, in order: tokenizers' AddedVocabulary::extract_and_normalize."""
        regex, group = self._added_matchers[0]
        for raw, start, added_id in self._find_added(text, regex, group):
            if added_id is not None:
                yield None, False, added_id
                continue
            normalized = self._normalize(raw) if self._normalize else raw
            for piece, offset, added in self._find_added(normalized, *self._added_matchers[1]):
                yield piece, start == 0 and offset == 0, added

    def _find_added(self, text, regex, group):
        """(piece, offset, None) and (None, offset, id) covering `text`, as tokenizers' find_matches: a token
        with lstrip / rstrip takes the white space before / after it."""
        pos = 0
        if regex is not None:
            for m in regex.finditer(text):
                start, stop = m.span()
                i, lstrip, rstrip = group[m.group()]
                if lstrip:
                    start = max(len(text[:start].rstrip(self._strip_space)), pos)
                if rstrip:
                    stop = len(text) - len(text[stop:].lstrip(self._strip_space))
                if pos < start:
                    yield text[pos:start], pos, None
                yield None, start, i
                pos = stop
        if pos < len(text):
            yield text[pos:], pos, None

    def _tokenize(self, piece):
        """The model's ids for one pre-tokenized piece."""
        ids = self._cache.get(piece)
        if ids is not None:
            return ids
        if self._scores is not None:
            try:
                ids = tokenizer_spm.spm_tokenize(piece, self._model_vocab, self._scores)
            except KeyError as e:
                raise TokenizerError(f"{self.source}: no token for {piece!r}: the vocabulary has no byte token "
                                     f"{e.args[0]}") from None
        else:
            word = piece.encode("utf-8").decode("latin-1").translate(self._byte_table) if self._byte_level else piece
            whole = self._model_vocab.get(word) if self._ignore_merges else None
            ids = [whole] if whole is not None else self._merge(self._symbols(word))
        if len(piece) < self._CACHE_PIECE:
            if len(self._cache) >= self._CACHE_SIZE:
                self._cache.clear()
            self._cache[piece] = ids
        return ids

    def _symbols(self, word):
        """One id per character, as tokenizers' BPE::merge_word: a character missing from the vocabulary becomes
        its <0xNN> byte tokens (byte_fallback, when all exist), else the unk token, which waits for the next
        character in the vocabulary (byte tokens go before it) and with fuse_unk stands for a whole run."""
        symbols, unk = [], False
        vocab = self._model_vocab
        for c in word:
            i = vocab.get(c)
            if i is not None:
                if unk:
                    symbols.append(self._unk_id)
                    unk = False
                symbols.append(i)
                continue
            if self._byte_fallback is not None:
                fallback = [self._byte_fallback[b] for b in c.encode("utf-8")]
                if None not in fallback:
                    symbols.extend(fallback)
                    continue
            if self._unk_id is not None:
                if unk and not self._fuse_unk:
                    symbols.append(self._unk_id)
                unk = True
        if unk:
            symbols.append(self._unk_id)
        return symbols

    def _merge(self, symbols):
        """Apply merges lowest rank first, leftmost first (tokenizers' `Word::merge_all`)."""
        n = len(symbols)
        merges = self._merges
        heap = []
        for pos in range(n - 1):
            m = merges.get(symbols[pos] << 32 | symbols[pos + 1])
            if m is not None:
                heap.append((m[0], pos, m[1]))
        if not heap:
            return symbols
        heapq.heapify(heap)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        while heap:
            _, pos, new = heapq.heappop(heap)
            right = nxt[pos]
            if symbols[pos] is None or right >= n:
                continue
            m = merges.get(symbols[pos] << 32 | symbols[right])
            if m is None or m[1] != new:  # a stale entry: one side was merged since
                continue
            symbols[pos], symbols[right] = new, None
            after = nxt[right]
            nxt[pos] = after
            if after < n:
                prev[after] = pos
                m = merges.get(new << 32 | symbols[after])
                if m is not None:
                    heapq.heappush(heap, (m[0], pos, m[1]))
            before = prev[pos]
            if before >= 0:
                m = merges.get(symbols[before] << 32 | new)
                if m is not None:
                    heapq.heappush(heap, (m[0], before, m[1]))
        return [s for s in symbols if s is not None]

    # -- decode ------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`, through the decoder as tokenizers runs it (byte-level: bytes that are not valid UTF-8
        become U+FFFD; byte fallback: one U+FFFD per byte of a <0xNN> run that is not UTF-8)."""
        tokens = []
        for k, i in enumerate(ids):
            if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
                raise TypeError(f"{self.source}: decode: ids[{k}] = {i!r} is not an integer id")
            token = self._decode_token.get(int(i))
            if token is None:
                raise TokenizerError(f"{self.source}: id {i} is not in the vocabulary (size {self.vocab_size})")
            if not (skip_special_tokens and token in self._special_contents):
                tokens.append(token)
        if self._decoders is None:
            return " ".join(tokens)
        for step in self._decoders:
            tokens = step(tokens)
        return "".join(tokens)

    # -- chat --------------------------------------------------------------------------
    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True, tools=None,
                            documents=None, **kwargs):
        """The model's chat template rendered as transformers' apply_chat_template renders it.

        kwargs reach the template (e.g. enable_thinking=False for Qwen3 and SmolLM3), after the
        special tokens (bos_token, eos_token, pad_token, unk_token: those that are set), as in
        transformers; chat_template= renders another template. Returns the ids (the text encoded
        without BOS/EOS, as transformers does) or, with tokenize=False, the text. The renderer is
        lora_np.chat_template (no jinja2): a construct it does not know raises NotImplementedError,
        an error the template raises (raise_exception) is a ValueError.
        """
        for option in sorted(_HF_CHAT_OPTIONS.intersection(kwargs)):
            if kwargs.pop(option) not in (None, False):
                raise NotImplementedError(f"{self.source}: apply_chat_template: transformers' option "
                                          f"{option} is not supported")
        template = kwargs.pop("chat_template", None) or self.chat_template
        if template is None:
            raise NotImplementedError(f"{self.source}: has no chat template")
        if isinstance(messages, (list, tuple)) and not messages:
            raise ValueError(f"{self.source}: cannot apply the chat template to an empty conversation")
        special = {name: token for name, token in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                                   ("unk_token", self.unk_token), ("pad_token", self.pad_token))
                   if token is not None}
        text = render_chat(template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                           documents=documents, special_tokens=special, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text


# apply_chat_template options of transformers that are not template variables and that lora_np does not have
_HF_CHAT_OPTIONS = frozenset(("continue_final_message", "return_assistant_tokens_mask", "return_dict",
                              "return_tensors", "padding", "truncation", "max_length", "tokenizer_kwargs",
                              "sanitize_control_tokens"))


# -- loaders -----------------------------------------------------------------------------

def load_tokenizer(path, pre_tokenizer=None) -> Tokenizer:
    """A `Tokenizer` from a tokenizer.json, a Hugging Face folder, or a .gguf file; a model's config.json or
    .safetensors file means the folder it is in (every path load_model takes names its tokenizer too).

    pre_tokenizer: a name in PRE_TOKENIZERS to use instead of the one the file describes
    ("gpt2" reproduces what transformers builds from a SmolLM GGUF).
    """
    path = os.fspath(path)
    if pre_tokenizer is not None and pre_tokenizer not in PRE_TOKENIZERS:
        raise ValueError(f"unknown pre_tokenizer {pre_tokenizer!r}; known: {sorted(PRE_TOKENIZERS)}")
    override = PRE_TOKENIZERS.get(pre_tokenizer)
    if path.endswith(".gguf"):
        return _from_gguf(path, override)
    if os.path.isfile(path) and (path.endswith(".safetensors") or os.path.basename(path) == "config.json"):
        path = os.path.dirname(path) or "."
    if os.path.isdir(path):
        return _from_folder(path, override)
    if os.path.isfile(path):
        return _from_tokenizer_json(path, {}, None, override)
    raise FileNotFoundError(f"{path}: no such tokenizer.json, folder or .gguf file")


def _special_content(value):
    """A special token as tokenizer_config.json writes it: a str or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _from_folder(folder, override):
    tokenizer_json = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(tokenizer_json):
        raise FileNotFoundError(f"{folder}: no tokenizer.json (vocab.json/merges.txt folders are not supported)")
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        file = os.path.join(folder, name)
        if os.path.isfile(file):
            config.update(read_json_object(file, TokenizerError))
    chat_template = config.get("chat_template")
    if isinstance(chat_template, list):  # [{"name": ..., "template": ...}]
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in chat_template):
            raise TokenizerError(f"{folder}: chat_template must be a string or a list of {{name, template}}")
        chat_template = {t["name"]: t.get("template") for t in chat_template}.get("default")
    if chat_template is not None and not isinstance(chat_template, str):
        raise TokenizerError(f"{folder}: chat_template must be a string, got {type(chat_template).__name__}")
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as fh:
            chat_template = fh.read()
    return _from_tokenizer_json(tokenizer_json, config, chat_template, override)


def _post_processor_ids(spec, where):
    """(prefix ids, suffix ids) of a tokenizer.json post_processor for a single sequence."""
    kind = spec.get("type") if spec else None
    if kind is None or kind == "ByteLevel":
        return [], []
    if kind == "Sequence":
        prefix, suffix = [], []
        for sub in spec["processors"]:
            p, s = _post_processor_ids(sub, where)
            prefix, suffix = prefix + p, s + suffix
        return prefix, suffix
    if kind == "TemplateProcessing":
        prefix, suffix, seen = [], [], False
        for item in spec["single"]:
            if "Sequence" in item:
                seen = True
            else:
                name = item["SpecialToken"]["id"]
                (suffix if seen else prefix).extend(spec["special_tokens"][name]["ids"])
        return prefix, suffix
    raise NotImplementedError(f"{where}: post_processor {kind!r} is not supported")


def _structured(file, section, fn, *args, **kwargs):
    """fn(*args, **kwargs) for a section of tokenizer.json, a missing or mistyped part named as a TokenizerError."""
    try:
        return fn(*args, **kwargs)
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise TokenizerError(f"{file}: {section} is malformed ({type(e).__name__}: {e})") from None
    except re.error as e:
        raise TokenizerError(f"{file}: {section} has an invalid regex ({e})") from None


def _from_tokenizer_json(file, config, chat_template, override):
    data = read_json_object(file, TokenizerError)
    model = data.get("model") or {}
    if not isinstance(model, dict):
        raise TokenizerError(f"{file}: 'model' must be an object, got a {type(model).__name__}")
    for key, kind in (("decoder", dict), ("normalizer", dict), ("pre_tokenizer", dict), ("post_processor", dict),
                      ("added_tokens", list)):
        if data.get(key) is not None and not isinstance(data[key], kind):
            raise TokenizerError(f"{file}: {key!r} must be a JSON {kind.__name__.replace('dict', 'object')}, "
                                 f"got {data[key]!r:.80}")
    if model.get("type") != "BPE":
        raise NotImplementedError(f"{file}: model type {model.get('type')!r} (only BPE)")
    for key, ok in (("dropout", None), ("continuing_subword_prefix", ""), ("end_of_word_suffix", "")):
        if model.get(key) not in (ok, None):
            raise NotImplementedError(f"{file}: model.{key} = {model[key]!r} is not supported")
    for key in ("byte_fallback", "fuse_unk", "ignore_merges"):
        if not isinstance(model.get(key, False), bool):
            raise TokenizerError(f"{file}: model.{key} must be true or false, got {model[key]!r:.80}")
    if not isinstance(model.get("merges"), list) or not isinstance(model.get("vocab"), dict):
        raise TokenizerError(f"{file}: model.vocab must be an object and model.merges a list")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else m for m in model["merges"]]
    prefix, suffix = _structured(file, "post_processor", _post_processor_ids, data.get("post_processor"), file)
    if not all(_is_id(i) for i in prefix + suffix):
        raise TokenizerError(f"{file}: post_processor ids {prefix + suffix} are not all ids")
    special = {k: _special_content(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    # BOS/EOS come from the post-processor only: transformers 5 ignores add_bos_token / add_eos_token in
    # tokenizer_config.json when a tokenizer.json is there.
    for name, value in [*special.items(), ("model.unk_token", model.get("unk_token"))]:
        if value is not None and not isinstance(value, str):
            raise TokenizerError(f"{file}: {name} must be a string, got {value!r:.80}")
    return Tokenizer(model["vocab"], merges, data.get("added_tokens") or [], override or data.get("pre_tokenizer"),
                     normalizer=data.get("normalizer"), decoder=data.get("decoder"), prefix_ids=prefix,
                     suffix_ids=suffix, model_unk_token=model.get("unk_token"),
                     byte_fallback=model.get("byte_fallback", False), fuse_unk=model.get("fuse_unk", False),
                     ignore_merges=model.get("ignore_merges", False), chat_template=chat_template, source=file,
                     **special)


# llama.cpp's token types (tokenizer.ggml.token_type)
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4


def _from_gguf(path, override):
    """A GGUF's tokenizer: tokenizer.ggml.model "gpt2" (byte-level BPE) or "llama" (SentencePiece with scores),
    as llama.cpp (src/llama-vocab.cpp) reads it."""
    from .gguf import GGUFFile

    meta = GGUFFile(path).metadata

    def get(key, default=KeyError):
        if key not in meta:
            if default is KeyError:
                raise TokenizerError(f"{path}: metadata key {key!r} is missing")
            return default
        return meta[key]

    kind = get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise NotImplementedError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (only 'gpt2', "
                                  "byte-level BPE, and 'llama', SentencePiece)")
    tokens = get("tokenizer.ggml.tokens")
    token_types = get("tokenizer.ggml.token_type", [])
    arrays = [("tokenizer.ggml.tokens", tokens, str), ("tokenizer.ggml.token_type", token_types, int)]
    if kind == "gpt2":
        arrays.append(("tokenizer.ggml.merges", get("tokenizer.ggml.merges"), str))
    else:
        arrays.append(("tokenizer.ggml.scores", get("tokenizer.ggml.scores", []), (int, float)))
    for key, value, types in arrays:
        if not isinstance(value, list) or not all(isinstance(v, types) and not isinstance(v, bool) for v in value):
            raise TokenizerError(f"{path}: {key} must be an array of {getattr(types, '__name__', 'number')}")
    if not tokens or len(tokens) > MAX_ID + 1:
        raise TokenizerError(f"{path}: tokenizer.ggml.tokens has {len(tokens)} tokens")

    def token_id(key, default=None):
        i = get(key, None)
        if i is None:
            return default if default is not None and default < len(tokens) else None
        if not (_is_id(i) and i < len(tokens)):
            raise TokenizerError(f"{path}: {key} = {i!r} is outside the vocabulary of {len(tokens)}")
        return i

    # llama.cpp's defaults for a SentencePiece vocabulary: <unk> 0, <s> 1, </s> 2, BOS added.
    spm = kind == "llama"
    bos, eos = token_id("tokenizer.ggml.bos_token_id", 1 if spm else None), \
        token_id("tokenizer.ggml.eos_token_id", 2 if spm else None)
    pad = token_id("tokenizer.ggml.padding_token_id")
    unk = token_id("tokenizer.ggml.unknown_token_id", 0 if spm else None)
    kwargs, spelled, add_bos = (_gguf_spm if spm else _gguf_byte_level)(path, tokens, token_types, get, override)
    prefix = [bos] if get("tokenizer.ggml.add_bos_token", add_bos) and bos is not None else []
    suffix = [eos] if get("tokenizer.ggml.add_eos_token", False) and eos is not None else []
    return Tokenizer(**kwargs, prefix_ids=prefix, suffix_ids=suffix,
                     **{name: None if i is None else spelled[i] for name, i in
                        (("bos_token", bos), ("eos_token", eos), ("pad_token", pad), ("unk_token", unk))},
                     chat_template=get("tokenizer.chat_template", None), source=path)


def _gguf_byte_level(path, tokens, token_types, get, override):
    pre = get("tokenizer.ggml.pre", None)
    if pre not in GGUF_PRE_TOKENIZERS and override is None:
        raise NotImplementedError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported (known: "
                                  f"{sorted(GGUF_PRE_TOKENIZERS)}); pass pre_tokenizer= one of "
                                  f"{sorted(PRE_TOKENIZERS)}")
    layout, ignore_merges, add_bos = GGUF_PRE_TOKENIZERS.get(pre, (None, False, False))
    # As transformers' byte_level_tokenizer: a token outside the byte alphabet is respelled from its bytes.
    byte_char = bytes_to_unicode()
    alphabet = set(byte_char.values())
    spelled = [t if set(t) <= alphabet else "".join(byte_char[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    merges = [tuple(m.split(" ")) for m in get("tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise TokenizerError(f"{path}: tokenizer.ggml.merges has an entry that is not two tokens")
    # Control tokens spelled in the byte alphabet are special; user-defined ones are plain.
    added = [{"id": i, "content": t, "special": True, "normalized": False}
             for i, (t, kind) in enumerate(zip(tokens, token_types)) if kind == _CONTROL and set(t) <= alphabet]
    added += [{"id": vocab[t], "content": t, "special": False, "normalized": False}
              for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED and t in vocab]
    return dict(vocab=vocab, merges=merges, added_tokens=added, pre_tokenizer=override or PRE_TOKENIZERS[layout],
                decoder={"type": "ByteLevel"}, ignore_merges=ignore_merges), spelled, add_bos


def _gguf_spm(path, tokens, token_types, get, override):
    """llama.cpp's SPM vocabulary: text " " -> "▁", with a leading "▁" after the start and after every special
    token when tokenizer.ggml.add_space_prefix (default true); unknown, control and user-defined tokens are
    cut out of the text whole. Decoded as transformers' LlamaTokenizer decodes."""
    if override is not None:
        raise ValueError(f"{path}: a SentencePiece ('llama') vocabulary has no pre-tokenizer to replace")
    spelled = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # as llama.cpp names an empty token
    vocab = {}
    for i, t in enumerate(spelled):
        if vocab.setdefault(t, i) != i:
            raise TokenizerError(f"{path}: tokenizer.ggml.tokens has {t!r} twice (ids {vocab[t]} and {i})")
    scores = [float(s) for s in get("tokenizer.ggml.scores", [0.0] * len(tokens))]
    if len(scores) < len(tokens):
        raise TokenizerError(f"{path}: tokenizer.ggml.scores has {len(scores)} scores for {len(tokens)} tokens")
    space_prefix = get("tokenizer.ggml.add_space_prefix", True)
    if not isinstance(space_prefix, bool):
        raise TokenizerError(f"{path}: tokenizer.ggml.add_space_prefix must be a bool, got {space_prefix!r}")
    # llama.cpp's attributes by model name: in a Phi-3 every special token but <unk>, <s> and <|endoftext|>
    # takes the white space after it (rstrip), white space as C's isspace.
    phi3 = any(name in str(get("general.name", "")).lower() for name in ("phi-3", "phi3"))
    added = [{"id": i, "content": spelled[i], "special": kind != _USER_DEFINED, "normalized": False,
              "rstrip": phi3 and spelled[i] not in ("<unk>", "<s>", "<|endoftext|>")}
             for i, kind in enumerate(token_types[:len(tokens)]) if kind in (_UNKNOWN, _CONTROL, _USER_DEFINED)]
    escape = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    unescape = {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}
    prefix = [{"type": "Prepend", "prepend": "\u2581"}] if space_prefix else []
    strip = [{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if space_prefix else []
    return dict(vocab=vocab, merges=[], added_tokens=added, pre_tokenizer=None, scores=scores[:len(tokens)],
                strip_space=" \t\n\v\f\r",
                normalizer={"type": "Sequence", "normalizers": [*prefix, escape]},
                decoder={"type": "Sequence", "decoders": [unescape, {"type": "ByteFallback"}, {"type": "Fuse"},
                                                          *strip]}), spelled, True
