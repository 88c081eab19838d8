"""Training data: text and JSONL files into fixed-length examples, split, and batched.

    examples = load_examples("train.jsonl", tokenizer, seq_len=256)
    train, val = train_val_split(examples, val_fraction=0.1, seed=0)
    batches = Batches(train, batch_size=4, seed=0)
    ids, labels = batches.next_batch()           # int64 [B, T] each

An example is `Example(input_ids, labels)`, two int64 arrays of length seq_len. Labels
follow transformers' convention: they are aligned with input_ids (not shifted; the model's
loss predicts labels[t + 1] from position t) and are IGNORE_INDEX (-100) where there is
no loss: prompt tokens, user/system turns, padding. Padding is on the right with the
tokenizer's pad token (its eos token if it has none); attention is causal, so right
padding never changes the real positions and no attention mask is needed.

File formats (chosen by the extension):

- `.txt`: the whole file is one document: `prefix + encode(text) + eos` (prefix: the
  tokens `encode(..., add_special_tokens=True)` puts in front, e.g. BOS; none for SmolLM2).
  Blank lines are kept as text, not treated as document breaks. Packed (below).
- `.jsonl`, one JSON object a line (blank lines skipped), one format per file:
  - `{"text": str}`: each text is a document as above; all are packed.
  - `{"prompt": str, "completion": str}`: `prefix + encode(prompt)` then
    `encode(completion) + eos`, encoded separately so the boundary is exact; loss on the
    completion and its eos (the model learns to stop). One example a row.
  - `{"messages": [{"role": str, "content": str}, ...]}`: `apply_chat_template(messages)`
    with the model's own chat template; loss on each assistant turn's content and the special
    token closing it (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`...), nothing else.
    The spans come from rendering the conversation up to each assistant turn's generation
    prompt (a prefix of the whole text) and through the turn; where a template renders a turn
    differently once others follow it (Qwen3's drops an earlier turn's reasoning and empty
    `<think></think>`), the turn runs in the whole rendering to its first special token, if the
    text before it is the end of the turn's content. A row where a turn cannot be located either
    way is an error. One example a row.
  Extra keys are ignored. A bad line raises ValueError naming `file:line` and the problem.

Packing concatenates the documents (eos between them) and cuts blocks of seq_len tokens,
labels = input_ids. The last partial block is padded and kept when it has at least two
tokens (one token has nothing to predict). Row examples longer than seq_len are cut at
seq_len; a row left with nothing to predict (no label after position 0) is dropped with a
warning.
"""
import json
import os
import warnings
import zlib
from typing import NamedTuple

import numpy as np

from .chat_template import ChatTemplateError

__all__ = ["IGNORE_INDEX", "Example", "load_examples", "pack", "train_val_split", "Batches"]

IGNORE_INDEX = -100


class Example(NamedTuple):
    input_ids: np.ndarray  # int64 [T]
    labels: np.ndarray  # int64 [T], IGNORE_INDEX where there is no loss


# -- reading --------------------------------------------------------------------------------------

def load_examples(path, tokenizer, seq_len):
    """Examples of exactly `seq_len` tokens from a .txt or .jsonl file (see the module docstring)."""
    path = os.fspath(path)
    if seq_len < 2:
        raise ValueError(f"{path}: seq_len must be at least 2, got {seq_len}")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no eos token to end documents with")
    pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    if path.endswith(".txt"):
        with open(path, "rb") as f:  # bytes, so the text is kept exactly ("\r\n" included)
            text = _utf8(f.read(), path)
        examples = pack([_document(tokenizer, text)], seq_len, pad_id)
    elif path.endswith(".jsonl"):
        examples = _load_jsonl(path, tokenizer, seq_len, pad_id)
    else:
        raise ValueError(f"{path}: unsupported file type; expected .txt or .jsonl")
    if not examples:
        raise ValueError(f"{path}: no training examples")
    return examples


def _utf8(raw, where):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text: {e}") from None


def _document(tokenizer, text):
    return [*tokenizer.prefix_ids, *tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]


def _load_jsonl(path, tokenizer, seq_len, pad_id):
    rows, kind, first = [], None, None
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            line = _utf8(raw.removeprefix(b"\xef\xbb\xbf") if lineno == 1 else raw, where)  # a BOM may open the file
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON: {e.msg} at column {e.colno}") from None
            except RecursionError:
                raise ValueError(f"{where}: JSON nested too deeply to read") from None
            row_kind = _row_kind(row, where)
            if kind is None:
                kind, first = row_kind, lineno
            elif row_kind != kind:
                raise ValueError(f"{where}: a {row_kind} row in a file whose line {first} is a {kind} row; "
                                 "use one format per file")
            rows.append((where, row))

    if kind == "text":
        return pack([_document(tokenizer, row["text"]) for _, row in rows], seq_len, pad_id)
    examples, dropped, cut = [], [], []
    for where, row in rows:
        if kind == "prompt/completion":
            prompt = [*tokenizer.prefix_ids, *tokenizer.encode(row["prompt"], add_special_tokens=False)]
            completion = [*tokenizer.encode(row["completion"], add_special_tokens=False), tokenizer.eos_token_id]
            ids, labels = prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
        else:
            ids, labels = _chat_example(tokenizer, row["messages"], where)
        if len(ids) > seq_len:
            cut.append((where, len(ids)))
        example = _padded(ids, labels, seq_len, pad_id)
        if (example.labels[1:] != IGNORE_INDEX).any():  # position 0's label is never predicted
            examples.append(example)
        else:
            dropped.append(where)
    if cut:
        warnings.warn(f"{len(cut)} of {len(rows)} rows are longer than seq_len={seq_len} and were cut, losing "
                      f"their last tokens (longest: {max(n for _, n in cut)} tokens at "
                      f"{max(cut, key=lambda c: c[1])[0]}); raise --seq-len to keep them whole", stacklevel=3)
    if dropped:
        warnings.warn(f"{len(dropped)} rows have no labelled token within seq_len={seq_len} and were dropped "
                      f"(first: {dropped[0]})", stacklevel=3)
    return examples


def _row_kind(row, where):
    """'text', 'prompt/completion' or 'messages', after checking the keys and types."""
    def require_str(value, what):
        if not isinstance(value, str):
            raise ValueError(f"{where}: {what} must be a string, got {type(value).__name__}")

    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list):
            raise ValueError(f"{where}: 'messages' must be a list, got {type(messages).__name__}")
        if not messages:
            raise ValueError(f"{where}: 'messages' is empty")
        for k, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ValueError(f"{where}: messages[{k}] must be an object, got {type(message).__name__}")
            for key in ("role", "content"):
                if key not in message:
                    raise ValueError(f"{where}: messages[{k}] has no {key!r}")
                require_str(message[key], f"messages[{k}][{key!r}]")
        if not any(message["role"] == "assistant" for message in messages):
            raise ValueError(f"{where}: no 'assistant' message, so nothing to learn")
        if messages[0]["role"] == "assistant":
            raise ValueError(f"{where}: messages[0] is an assistant turn; start with a system or user message")
        return "messages"
    if "prompt" in row or "completion" in row:
        for key in ("prompt", "completion"):
            if key not in row:
                other = "completion" if key == "prompt" else "prompt"
                raise ValueError(f"{where}: has {other!r} but no {key!r}")
            require_str(row[key], repr(key))
        return "prompt/completion"
    if "text" in row:
        require_str(row["text"], "'text'")
        return "text"
    raise ValueError(f"{where}: expected a 'text', 'prompt' and 'completion', or 'messages' key; "
                     f"got {sorted(row)}")


def _chat_example(tokenizer, messages, where):
    """(ids, labels) of a conversation: labels on each assistant turn, through the special token closing it.

    For assistant turn k the conversation is rendered up to the turn's generation prompt, which
    must be a prefix of the whole, and through the turn. The labels start where the first
    rendering's tokens stop matching the whole's (so a token that straddles the boundary, e.g.
    "\n\n" when the content begins with "\n", is learned) and run while the second rendering's
    tokens still match (a template may close the conversation differently from a turn, e.g.
    Phi-3's eos_token), less trailing whitespace (ChatML's "\n" after <|im_end|>); what is left
    must end with a special token, the end-of-turn marker the model learns to stop on.
    """
    def render(conversation, add_generation_prompt=False):
        try:
            return tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                 tokenize=False)
        except ChatTemplateError as e:
            raise ValueError(f"{where}: the chat template refuses this conversation: {e}") from None

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)  # as apply_chat_template(messages) encodes

    text = render(messages)
    ids = encode(text)
    labels = [IGNORE_INDEX] * len(ids)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:k], add_generation_prompt=True)
        if not text.startswith(before):
            raise ValueError(f"{where}: messages[{k}]: the conversation rendered up to this assistant turn's "
                             "generation prompt is not a prefix of the whole, so the turn cannot be located")
        start = _common_prefix_length(ids, encode(before))
        end = _common_prefix_length(ids, encode(render(messages[:k + 1])))
        while end > start and tokenizer.decode([ids[end - 1]]).isspace():
            end -= 1
        if not _ends_with_special(tokenizer, ids, start, end):
            end = _turn_end_in_place(tokenizer, ids, start, message)
        if end is None:
            raise ValueError(f"{where}: messages[{k}]: the chat template renders this assistant turn differently "
                             "at the end of the conversation and within it, or closes it with no special token, "
                             "so there is no end-of-turn marker to learn")
        labels[start:end] = ids[start:end]
    return ids, labels


def _is_special(tokenizer, token_id):
    return tokenizer.decode([token_id], skip_special_tokens=True) == ""


def _ends_with_special(tokenizer, ids, start, end):
    return end > start and _is_special(tokenizer, ids[end - 1])


def _turn_end_in_place(tokenizer, ids, start, message):
    """Where an assistant turn that starts at ids[start] ends in the whole conversation's ids (one past its
    closing special token), for a template that renders a turn differently once others follow it (Qwen3's
    drops an earlier turn's reasoning and its empty <think></think>): the first special token from start,
    provided the text before it is what the turn's content renders to (its content, or the part after a
    dropped reasoning block); else None."""
    end = next((e for e in range(start, len(ids)) if _is_special(tokenizer, ids[e])), None)
    if end is None:
        return None
    text, content = tokenizer.decode(ids[start:end]).strip(), message.get("content")
    if not isinstance(content, str) or not text or not content.strip().endswith(text):
        return None
    return end + 1


def end_of_turn_id(tokenizer):
    """The special token the chat template closes an assistant turn with (<|im_end|>, <|eot_id|>,
    <end_of_turn>...), found as `{"messages"}` rows find it, on a turn in mid-conversation; None
    when the template locates no such turn."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "Bye"}]
    try:
        ids, labels = _chat_example(tokenizer, probe, "chat template")
    except ValueError:
        return None
    return next(i for i, label in zip(reversed(ids), reversed(labels)) if label != IGNORE_INDEX)


def _common_prefix_length(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# -- shaping --------------------------------------------------------------------------------------

def _padded(ids, labels, seq_len, pad_id):
    """Cut to seq_len, then right-pad: ids with pad_id, labels with IGNORE_INDEX."""
    n = min(len(ids), seq_len)
    input_ids = np.full(seq_len, pad_id, dtype=np.int64)
    out_labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    input_ids[:n] = ids[:n]
    out_labels[:n] = labels[:n]
    return Example(input_ids, out_labels)


def pack(documents, seq_len, pad_id):
    """Concatenate token lists into blocks of seq_len (labels = ids); pad a last block of >= 2 tokens."""
    ids = np.fromiter((t for doc in documents for t in doc), dtype=np.int64)
    n_full = len(ids) // seq_len
    examples = [Example(block.copy(), block.copy()) for block in ids[:n_full * seq_len].reshape(n_full, seq_len)]
    tail = ids[n_full * seq_len:]
    if len(tail) >= 2:
        examples.append(_padded(tail, tail, seq_len, pad_id))
    return examples


def train_val_split(examples, val_fraction, seed):
    """(train, val): a seeded random `val_fraction` of the examples (at least one if > 0), order kept.

    val_fraction 0 gives (all examples, []).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"train_val_split: val_fraction must be in [0, 1), got {val_fraction}")
    n = len(examples)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0:
        n_val = max(1, n_val)
        if n_val >= n:
            raise ValueError(f"train_val_split: {n} examples are too few to hold out {val_fraction:.0%} "
                             "and still train on one")
    order = np.random.default_rng(seed).permutation(n)
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
    return [examples[i] for i in train], [examples[i] for i in val]


# -- batching -------------------------------------------------------------------------------------

class Batches:
    """(input_ids [B, T], labels [B, T]) int64 batches over equal-length examples, epoch after epoch.

    Epoch e visits the examples in the order `default_rng([seed, e]).permutation(n)` (or in
    order when shuffle=False), so the order depends only on (seed, epoch) and a resumed
    run sees exactly the batches an uninterrupted one would. The last batch of an epoch
    is smaller unless drop_last.

    `epoch` and `position` name the *next* batch: when the last batch of an epoch is
    taken, `epoch` moves on at once. `state_dict()` saves them (plus what must match to
    resume: batch size, seed, shuffle, drop_last, number of examples and a CRC-32 of the data).
    """

    def __init__(self, examples, batch_size, seed=0, shuffle=True, drop_last=False):
        if not examples:
            raise ValueError("Batches: no examples")
        lengths = {len(e[0]) for e in examples} | {len(e[1]) for e in examples}
        if len(lengths) != 1:
            raise ValueError(f"Batches: examples must all have one length, got lengths {sorted(lengths)}")
        if batch_size < 1 or (drop_last and batch_size > len(examples)):
            raise ValueError(f"Batches: batch_size {batch_size} with {len(examples)} examples "
                             f"(drop_last={drop_last}) gives no batch")
        self._ids = np.stack([np.asarray(e[0], dtype=np.int64) for e in examples])  # [N, T]
        self._labels = np.stack([np.asarray(e[1], dtype=np.int64) for e in examples])  # [N, T]
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = None, None

    @property
    def num_examples(self):
        return len(self._ids)

    def __len__(self):
        """Batches per epoch."""
        n, b = self.num_examples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch):
        """The example indices of `epoch`, in visiting order."""
        if self._order_epoch != epoch:
            n = self.num_examples
            self._order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def next_batch(self):
        """The next batch; after an epoch's last batch the next epoch (reshuffled) begins."""
        b = self.batch_size
        idx = self.order(self.epoch)[self.position * b:(self.position + 1) * b]
        self.position += 1
        if self.position == len(self):
            self.epoch, self.position = self.epoch + 1, 0
        return self._ids[idx], self._labels[idx]

    def __iter__(self):
        """The rest of the current epoch (all of it from position 0)."""
        epoch = self.epoch
        while self.epoch == epoch:
            yield self.next_batch()

    def _identity(self):
        return {"batch_size": self.batch_size, "seed": self.seed, "shuffle": self.shuffle,
                "drop_last": self.drop_last, "num_examples": self.num_examples,
                "data_crc32": zlib.crc32(self._labels.tobytes(), zlib.crc32(self._ids.tobytes()))}

    def state_dict(self):
        """JSON-able position: {"epoch", "position", and the settings that must match to resume}."""
        return {"epoch": self.epoch, "position": self.position, **self._identity()}

    def load_state_dict(self, state_dict):
        """Continue at the saved batch; raises ValueError if the data or settings differ."""
        for key, value in self._identity().items():
            if state_dict[key] != value:
                raise ValueError(f"Batches.load_state_dict: saved {key} is {state_dict[key]!r}, this loader's is "
                                 f"{value!r}; resuming would not continue with the same batches")
        if not 0 <= state_dict["position"] < len(self):
            raise ValueError(f"Batches.load_state_dict: position {state_dict['position']} is outside "
                             f"0..{len(self) - 1}")
        self.epoch, self.position = int(state_dict["epoch"]), int(state_dict["position"])
