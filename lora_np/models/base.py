"""What every causal-LM family shares: the config base and its field checks, the GGUF config reader, the output
type, the forward pass (input ids -> logits and loss) and the hooks a family may override (GGUF names and tensor
transforms, GGUF tensors that are config, cache_invalid). The RoPE tables are in rope.py."""
import dataclasses
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .. import functional as F
from ..checkpointing import checkpoint
from ..gguf import GGUFError
from ..nn import Linear, Module
from ..options import Float, Int
from ..quant import QuantizedLinear
from ..tensor import Tensor, is_grad_enabled

# Sane bounds for what a config may say; the loaders also check every size against the tensors present.
SIZE = Int(min=1, max=2**24)
LAYERS = Int(min=1, max=2**14)
POSITIONS = Int(min=1, max=2**26)
EPS = Float(min=0, min_open=True, max=1)
THETA = Float(min=0, min_open=True)
DROPOUT = Float(min=0, max=1, max_open=True)
BOOL = (True, False)


def check_fields(config, rules):
    """Check and convert the fields named in `rules` {field: Int/Float rule or BOOL}: ValueError naming one."""
    for name, rule in rules.items():
        value = getattr(config, name)
        if rule is BOOL:
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        else:
            setattr(config, name, rule.check(name, value))


def refuse(where, field, value, why=""):
    raise NotImplementedError(f"{where}: {field} = {value!r} is not supported{why}")


def padding_idx(config):
    """transformers' embed_tokens takes config.pad_token_id as its padding_idx (that row gets no gradient, nor
    does it in a LoRA adapter on the embedding): the id when it is a row of the vocabulary (negative ones count
    from the end, as in torch), else None. A family's default pad id outside a small test vocabulary (Phi-3's
    32000, SmolLM3's 128004) leaves no padding row, where transformers could not build the model at all."""
    try:
        return F.check_padding_idx(getattr(config, "pad_token_id", None), config.vocab_size)
    except ValueError:
        return None


class Config:
    """Base of the family config dataclasses: dict round trip, and the config.json reading that a family
    overrides where transformers' file says more than the dataclass (defaults, renamed keys)."""

    layers_field = "num_hidden_layers"  # the field that counts decoder layers (named in the loaders' errors)
    # GGUF tensors that are config, not parameters (Llama 3's rope_freqs): the loader reads their values for
    # from_gguf (GGUFConfigReader.config_tensor) and assigns them to no parameter
    gguf_config_tensors = ()

    @classmethod
    def from_dict(cls, d):
        """The config from a dict, keys that are not fields ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_config_json(cls, d):
        """The config from a Hugging Face config.json dict."""
        return cls.from_dict(d)

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_config_json(self):
        """The config.json dict transformers reads for this config (the inverse of from_config_json)."""
        return {k: v for k, v in self.to_dict().items() if v is not None}

    def to_gguf(self):
        """(this config as its GGUF file holds it, {`{arch}.`-less key: value} it writes itself, {config tensor:
        float32 array}) for the GGUF export; a family whose converter writes more than from_gguf's keys (RoPE
        factor tensors, scaling keys) says so here. By default: itself, nothing more."""
        return self, {}, {}


class GGUFConfigReader:
    """Reads a family's config from GGUF metadata (llama.cpp's `{arch}.*` keys), every value checked: GGUFError
    naming the key. A family's `Config.from_gguf(reader)` calls `number` / `build` / `refuse_unless`, and
    `config_tensor` for the values of a tensor its `gguf_config_tensors` declares (`config_tensors`
    {name: float64 array}, those the loader read)."""

    def __init__(self, metadata, tensors, source, config_tensors=None):
        self.metadata, self.tensors, self.source = metadata, tensors, source
        self.config_tensors = config_tensors or {}
        self.arch = metadata.get("general.architecture")
        self.keys = {}  # config field -> the GGUF key it came from (for error messages)

    def key(self, name):
        """'{arch}.name' (llama.cpp's per-architecture key)."""
        return f"{self.arch}.{name}"

    def number(self, field, name, default=KeyError):
        """The number under '{arch}.name' for config `field`; `default` when absent (GGUFError if none)."""
        key = self.key(name)
        self.keys[field] = key
        value = self.metadata.get(key, default)
        if value is KeyError:
            raise GGUFError(f"{self.source}: metadata key {key!r} is missing")
        if value is not None and (isinstance(value, (list, str, bool)) or not isinstance(value, (int, float))):
            raise GGUFError(f"{self.source}: metadata key {key!r} is {value!r:.80}, expected a number")
        return value

    def config_tensor(self, name):
        """The values (float64) of the config tensor `name`: GGUFError if they were not read."""
        if name not in self.config_tensors:
            raise GGUFError(f"{self.source}: the values of tensor {name!r} were not given (gguf_config's load)")
        return self.config_tensors[name]

    def vocab_size(self):
        """'{arch}.vocab_size', else the tokenizer's token count, else token_embd's rows."""
        n = self.number("vocab_size", "vocab_size", None)
        if n:
            return n
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        embd = self.tensors.get("token_embd.weight")
        n = len(tokens) if isinstance(tokens, list) and tokens else (embd.shape[0] if embd is not None and embd.shape
                                                                      else None)
        if n is None:
            raise GGUFError(f"{self.source}: no vocabulary size: no {self.key('vocab_size')}, tokenizer.ggml.tokens "
                            "or token_embd.weight")
        return n

    def token_ids(self):
        """The special token ids a config takes from the tokenizer's keys, as transformers' GGUF loader reads
        them: bos and eos (None when absent), and pad_token_id only when tokenizer.ggml.padding_token_id is
        there (else the config's default stays, as in transformers)."""
        get = self.metadata.get
        pad = get("tokenizer.ggml.padding_token_id")
        if pad is not None:
            self.keys["pad_token_id"] = "tokenizer.ggml.padding_token_id"
        return dict(bos_token_id=get("tokenizer.ggml.bos_token_id"), eos_token_id=get("tokenizer.ggml.eos_token_id"),
                    **({} if pad is None else {"pad_token_id": pad}))

    def build(self, config_cls, **fields):
        """config_cls(**fields), its errors saying which GGUF key the field came from."""
        try:
            return config_cls(**fields)
        except ValueError as e:  # the message names the field: say which key it came from
            message = str(e)
            for field, key in self.keys.items():
                message = re.sub(rf"\b{field}\b", key, message)
            raise GGUFError(f"{self.source}: {message}") from None

    def refuse_unless(self, name, ok):
        """NotImplementedError when '{arch}.name' is present with a value not in `ok` (None: absent is fine)."""
        key = self.key(name)
        if self.metadata.get(key) not in ok:
            raise NotImplementedError(f"{self.source}: {key} = {self.metadata[key]!r} is not supported "
                                      f"(supported: {', '.join(map(repr, [v for v in ok if v is not None]))} or "
                                      "absent)")


@dataclass
class CausalLMOutput:
    logits: Tensor
    loss: Optional[Tensor] = None


class CausalLM(Module):
    """What every family shares: input ids -> logits (and the loss when labels are given). A family
    supplies its blocks, its embedding (with the RoPE tables, if any) and its final norm."""

    @classmethod
    def checkpoint_name(cls, key):
        """Checkpoint key -> parameter name; None for buffers we do not keep (rotary inv_freq, GPT-2 masks)."""
        if key.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            return None
        return key

    # GGUF tensor name -> parameter name: whole names ("token_embd.weight") and per-block suffixes
    # ("attn_q.weight", after "blk.N."); a family with a GGUF architecture fills both
    gguf_names = {}
    gguf_block_names = {}
    gguf_block_prefix = "model.layers"

    @classmethod
    def gguf_parameter_name(cls, gname):
        """The parameter a GGUF tensor holds, None for one the family does not know."""
        if gname.startswith("blk."):
            parts = gname.split(".", 2)
            if len(parts) == 3 and parts[1].isdigit() and parts[2] in cls.gguf_block_names:
                return f"{cls.gguf_block_prefix}.{parts[1]}.{cls.gguf_block_names[parts[2]]}"
            return None
        return cls.gguf_names.get(gname)

    @classmethod
    def from_gguf_tensor(cls, gname, array, config):
        """Undo what llama.cpp's converter did to a tensor beyond renaming it (nothing, unless a family says)."""
        return array

    def cache_invalid(self, past, total):
        """Whether a KV cache of `past` positions cannot serve a sequence of `total` (generation then drops it and
        recomputes every position): never, unless a family says (Phi-3's longrope switches its factors)."""
        return False

    def _blocks(self):
        raise NotImplementedError  # pragma: no cover

    def _embed(self, ids, past):
        raise NotImplementedError  # pragma: no cover

    def _final_norm(self, h):
        raise NotImplementedError  # pragma: no cover

    def forward(self, input_ids, labels=None, cache=None, attn_mask=None, logits_to_keep=0, return_logits=True):
        """logits (B, T, V) for input_ids (B, T), and the causal-LM loss when labels (B, T)
        are given. With labels and return_logits=False the loss is computed chunk by chunk
        without the (B, T, V) logits (training). `cache` (nn.KVCache) holds earlier positions; `logits_to_keep` > 0
        computes logits for the last that many positions only (generation). A family that sets
        `final_logit_softcapping` c (Gemma 2/3) gets logits c·tanh(z/c), in both paths. After
        gradient_checkpointing_enable(), a training forward with grad mode and no cache keeps only each block's
        input and recomputes the block in backward (lora_np.checkpointing)."""
        ids = np.asarray(input_ids.data if isinstance(input_ids, Tensor) else input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {ids.shape}")
        past = cache.seq_len() if cache is not None else 0
        h, cos, sin = self._embed(ids, past)                                          # (B, T, C)
        recompute = self.gradient_checkpointing and self.training and cache is None and is_grad_enabled()
        for block in self._blocks():
            h = checkpoint(block, h, cos, sin, cache, attn_mask) if recompute else block(h, cos, sin, cache, attn_mask)
        cap = self.final_logit_softcapping
        if labels is not None and not return_logits and type(self.lm_head) in (Linear, QuantizedLinear) \
                and self.lm_head.bias is None:  # a plain (un-adapted) head, float or in quantized blocks
            h = self._final_norm(h)
            return CausalLMOutput(None, F.causal_lm_head_loss(h, self.lm_head.weight, labels, softcap=cap))
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(self._final_norm(h))                                   # (B, T', V)
        if cap is not None:
            logits = F.mul(F.tanh(F.div(logits, cap)), cap)
        loss = F.causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits, loss)

    gradient_checkpointing = False  # recompute each block's forward in backward (training only)
    final_logit_softcapping = None  # c: logits c·tanh(z/c) (Gemma 2/3 set it from their config)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        """Keep only each decoder block's input in training and recompute the block in backward
        (lora_np.checkpointing): the same gradients for less memory. As transformers' method;
        gradient_checkpointing_kwargs may say use_reentrant (torch's two mechanisms compute the same
        gradients, and so does the one here, whichever is asked for); any other key is refused."""
        for key in gradient_checkpointing_kwargs or {}:
            if key != "use_reentrant":
                raise NotImplementedError(f"gradient_checkpointing_enable: gradient_checkpointing_kwargs[{key!r}] "
                                          "is not supported (supported: use_reentrant)")
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self):
        return self.gradient_checkpointing

    @property
    def dtype(self):
        return next(iter(self.parameters())).dtype

    def generate(self, *args, **kwargs):
        from ..generation import generate

        return generate(self, *args, **kwargs)
