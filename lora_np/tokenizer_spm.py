"""The SentencePiece-style parts of a tokenizer (Llama 2, TinyLlama, Mistral, Phi-3, Gemma), exact to Hugging
Face `tokenizers` 0.23 and to llama.cpp; `lora_np.tokenizer` assembles them.

tokenizer.json (tokenizers' src/normalizers, pre_tokenizers/metaspace.rs, decoders):
  - normalizers: Prepend, Replace (a string pattern), NFC / NFD / NFKC / NFKD, Sequence;
  - the Metaspace pre-tokenizer: " " -> "▁", a prefix "▁" (prepend_scheme always / first / never), and,
    with split, a cut before every "▁";
  - decoders: Replace, ByteFallback (runs of <0xNN> tokens become their bytes; a run that is not UTF-8
    becomes one U+FFFD per byte), Fuse, Strip, Metaspace.
GGUF "llama" vocabularies (llama.cpp's llm_tokenizer_spm_session in src/llama-vocab.cpp): `spm_tokenize`.

`tokenizers` normalizes with the unicode-normalization-alignments crate, whose Unicode is older than
Python's: the code points of _NEWER_THAN_TOKENIZERS (found by comparing the two on every code point) are
unassigned there, so it leaves them as they are and they stop any reordering or composition around them.
"""
from __future__ import annotations

import heapq
import re
import unicodedata

__all__ = ["normalizer", "metaspace", "DECODERS", "byte_token", "spm_tokenize"]

# Code points whose normalization (decomposition, combining class or composition) Python's unicodedata
# (Unicode 14) knows and tokenizers' crate does not.
_NEWER_THAN_TOKENIZERS = (
    (0x7FD, 0x7FD), (0x898, 0x89F), (0x8CA, 0x8D3), (0x9FE, 0x9FE), (0xC3C, 0xC3C), (0xD3B, 0xD3C), (0xEBA, 0xEBA),
    (0x1715, 0x1715), (0x1ABF, 0x1ACE), (0x1DF6, 0x1DFA), (0x32FF, 0x32FF), (0xA7F2, 0xA7F4), (0xA82C, 0xA82C),
    (0xAB69, 0xAB69), (0x10781, 0x10785), (0x10787, 0x107B0), (0x107B2, 0x107BA), (0x10D24, 0x10D27),
    (0x10EAB, 0x10EAC), (0x10F46, 0x10F50), (0x10F82, 0x10F85), (0x11070, 0x11070), (0x1133B, 0x1133B),
    (0x1145E, 0x1145E), (0x11839, 0x1183A), (0x11930, 0x11930), (0x11935, 0x11935), (0x11938, 0x11938),
    (0x1193D, 0x1193E), (0x11943, 0x11943), (0x119E0, 0x119E0), (0x11A34, 0x11A34), (0x11A47, 0x11A47),
    (0x11A99, 0x11A99), (0x11D42, 0x11D42), (0x11D44, 0x11D45), (0x11D97, 0x11D97), (0x16FF0, 0x16FF1),
    (0x1E130, 0x1E136), (0x1E2AE, 0x1E2AE), (0x1E2EC, 0x1E2EF), (0x1F16C, 0x1F16C), (0x1FBF0, 0x1FBF9),
)
_NEWER = re.compile("([" + "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in _NEWER_THAN_TOKENIZERS) + "])")


def _unicode_normalizer(form):
    def normalize(text):
        if unicodedata.is_normalized(form, text):
            return text
        parts = _NEWER.split(text)  # odd positions: the newer code points, kept as they are
        return "".join(p if k % 2 else unicodedata.normalize(form, p) for k, p in enumerate(parts))
    return normalize


def _replace_pattern(spec, where):
    pattern = spec["pattern"]
    if not isinstance(pattern, dict) or not isinstance(pattern.get("String"), str) or not pattern["String"]:
        raise NotImplementedError(f"{where}: Replace with pattern {pattern!r} (only a non-empty String)")
    if not isinstance(spec["content"], str):
        raise ValueError(f"{where}: Replace content {spec['content']!r} is not a string")
    return pattern["String"], spec["content"]


def normalizer(spec, where):
    """A tokenizer.json normalizer as a `str -> str` function (None for none)."""
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "Sequence":
        steps = [normalizer(sub, where) for sub in spec["normalizers"]]

        def sequence(text):
            for step in steps:
                text = step(text)
            return text
        return sequence
    if kind == "Prepend":
        prepend = spec["prepend"]
        return lambda text: prepend + text if text else text
    if kind == "Replace":
        old, new = _replace_pattern(spec, f"{where} Replace")
        return lambda text: text.replace(old, new)
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return _unicode_normalizer(kind)
    raise NotImplementedError(f"{where}: normalizer {kind!r} is not supported (Prepend, Replace, NFC, NFD, NFKC, "
                              "NFKD, Sequence)")


_PREPEND_SCHEMES = ("always", "first", "never")


def metaspace(spec, where):
    """The Metaspace pre-tokenizer as (step for the piece at the start of the text, step for any other piece)."""
    replacement = spec["replacement"]
    scheme = _prepend_scheme(spec, where)
    split = spec.get("split", True)
    if not isinstance(replacement, str) or len(replacement) != 1:
        raise ValueError(f"{where}: Metaspace replacement {replacement!r} is not one character")

    def step(prepend):
        def pre_tokenize(piece):
            piece = piece.replace(" ", replacement)
            if prepend and not piece.startswith(replacement):
                piece = replacement + piece
            if not split:
                return [piece]
            # MergedWithNext: each replacement starts a piece
            return [p for p in re.split(f"(?={re.escape(replacement)})", piece) if p]
        return pre_tokenize
    return step(scheme != "never"), step(scheme == "always")


def _prepend_scheme(spec, where):
    """prepend_scheme (default "always"), which an older add_prefix_space false must agree with, as tokenizers
    reads them."""
    scheme = spec.get("prepend_scheme", "always")
    if scheme not in _PREPEND_SCHEMES:
        raise ValueError(f"{where}: Metaspace prepend_scheme {scheme!r} (one of {_PREPEND_SCHEMES})")
    if spec.get("add_prefix_space") is False and scheme != "never":
        raise ValueError(f"{where}: Metaspace add_prefix_space false does not match prepend_scheme {scheme!r}")
    return scheme


# -- decoders: each a `list[str] -> list[str]` step of the chain -------------------------

def _replace_decoder(spec, where):
    old, new = _replace_pattern(spec, f"{where} Replace")
    return lambda tokens: [t.replace(old, new) for t in tokens]


def _byte_value(token):
    """The byte of a "<0xNN>" token (as Rust's u8::from_str_radix reads NN: an optional "+", hex digits)."""
    if len(token.encode("utf-8")) != 6 or not token.startswith("<0x") or not token.endswith(">"):
        return None
    digits = token[3:5]
    if re.fullmatch(r"\+?[0-9A-Fa-f]+", digits):
        return int(digits, 16)
    return None


def _byte_fallback(spec, where):
    def decode(tokens):
        out, run = [], bytearray()
        for token in tokens:
            b = _byte_value(token)
            if b is not None:
                run.append(b)
                continue
            _flush(run, out)
            out.append(token)
        _flush(run, out)
        return out
    return decode


def _flush(run, out):
    if run:
        try:
            out.append(run.decode("utf-8"))
        except UnicodeDecodeError:
            out.extend("\ufffd" * len(run))
        run.clear()


def _strip(spec, where):
    content, start, stop = spec["content"], spec["start"], spec["stop"]
    if not isinstance(content, str) or len(content) != 1:
        raise ValueError(f"{where}: Strip content {content!r} is not one character")

    def strip(token):
        cut = 0
        while cut < min(start, len(token)) and token[cut] == content:
            cut += 1
        end = len(token)
        while len(token) - end < min(stop, len(token) - cut) and token[end - 1] == content:
            end -= 1
        return token[cut:end]
    return lambda tokens: [strip(t) for t in tokens]


def _metaspace_decoder(spec, where):
    replacement, scheme = spec["replacement"], _prepend_scheme(spec, where)
    # The first token loses every replacement (not only a leading one) unless the scheme is never.
    first = "" if scheme != "never" else " "
    return lambda tokens: [t.replace(replacement, first if k == 0 else " ") for k, t in enumerate(tokens)]


DECODERS = {
    "Replace": _replace_decoder,
    "ByteFallback": _byte_fallback,
    "Fuse": lambda spec, where: lambda tokens: ["".join(tokens)],
    "Strip": _strip,
    "Metaspace": _metaspace_decoder,
}


# -- llama.cpp's SentencePiece tokenizer -------------------------------------------------

def byte_token(b):
    """The name of byte b's token in a SentencePiece vocabulary ("<0x0A>")."""
    return f"<0x{b:02X}>"


def spm_tokenize(text, vocab, scores):
    """llama.cpp's llm_tokenizer_spm_session.tokenize: ids of `text` (whitespace already escaped).

    Each character starts as a symbol; the adjacent pair whose concatenation is the token of highest
    score (leftmost among equals) is merged, until no pair is a token. A final symbol that is no
    token becomes the ids of its UTF-8 bytes (<0xNN>, else the one-byte token); a KeyError names
    a byte with neither.
    """
    n = len(text)
    if n == 0:
        return []
    start = list(range(n))  # symbol k: text[start[k]:start[k] + size[k]], 0 size once merged away
    size = [1] * n
    prev = list(range(-1, n - 1))
    nxt = list(range(1, n)) + [-1]
    heap = []

    def add_bigram(left, right):
        if left < 0 or right < 0:
            return
        token = vocab.get(text[start[left]:start[right] + size[right]])
        if token is not None:
            heapq.heappush(heap, (-scores[token], left, right, size[left] + size[right]))

    for k in range(1, n):
        add_bigram(k - 1, k)
    while heap:
        _, left, right, total = heapq.heappop(heap)
        if size[left] == 0 or size[right] == 0 or size[left] + size[right] != total:
            continue
        size[left], size[right] = total, 0
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        add_bigram(prev[left], left)
        add_bigram(left, nxt[left])

    ids, k = [], 0
    while k != -1:
        piece = text[start[k]:start[k] + size[k]]
        token = vocab.get(piece)
        if token is not None:
            ids.append(token)
        else:
            for b in piece.encode("utf-8"):
                token = vocab.get(byte_token(b))
                ids.append(token if token is not None else vocab[chr(b) if b < 0x80 else byte_token(b)])
        k = nxt[k]
    return ids
