"""Gradient checkpointing (lora_np.checkpointing, CausalLM.gradient_checkpointing_enable, --grad-checkpoint).

Properties tested:
- every family's LoRA gradients (all-linear adapters, attention and LoRA dropout on, two micro-batches
  accumulated, float64 and float32) are bit for bit the plain path's, and so is the loss;
- the dropout masks are replayed: the forward drew from the generator, and backward leaves it where the
  plain path leaves it;
- only training with grad mode checkpoints: eval, no_grad and a KV cache build the plain graph (or none);
- memory: with checkpointing each extra layer keeps its input only (B·T·C numbers), where the plain path
  keeps more than ten times that, and the peak of forward + backward is lower;
- a training run with --grad-checkpoint writes the same metrics and adapter as without; the CLI option
  and TrainArgs field, the PEFT wrapper's passthrough, and the refusals (unknown
  gradient_checkpointing_kwargs, an argument requiring grad, a non-bool option).
"""
import os
import tracemalloc

import numpy as np
import pytest

import lora_np
from lora_np import Tensor, no_grad
from lora_np.checkpointing import Checkpoint, checkpoint
from lora_np.cli import build_parser, train_args_from_namespace
from lora_np.lora import LoraConfig, get_peft_model
from lora_np.models import FAMILIES, family
from lora_np.nn import KVCache
from lora_np.options import OptionError
from lora_np.train import TrainArgs, train
from conftest import tiny_train_args

VOCAB = 61
CONFIG = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, attention_dropout=0.1)
GPT2_CONFIG = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.1,
                   resid_pdrop=0.1, embd_pdrop=0.1)


def _adapted(model_type, dtype="float64", **overrides):
    """A random tiny model of `model_type` with all-linear LoRA adapters (lora_B nonzero, dropout 0.2), training."""
    config_cls, model_cls = family(model_type)
    fields = dict(GPT2_CONFIG if model_type == "gpt2" else CONFIG, model_type=model_type, **overrides)
    lora_np.manual_seed(0)
    model = model_cls(config_cls.from_config_json(fields)).to(dtype)
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.2, target_modules="all-linear",
                                            fan_in_fan_out=model_type == "gpt2"))
    rng = np.random.default_rng(1)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data[...] = rng.normal(0, 0.1, p.shape)
    return peft.train()


def _accumulated_grads(peft, micro_batches=2):
    """(losses, {name: grad}, generator state after) of `micro_batches` forward + backward passes."""
    rng = np.random.default_rng(5)
    losses = []
    for _ in range(micro_batches):
        ids = rng.integers(0, VOCAB, (2, 9))
        before = lora_np.functional.default_generator().bit_generator.state
        loss = peft(ids, labels=ids, return_logits=False).loss
        assert lora_np.functional.default_generator().bit_generator.state != before, "dropout drew no mask"
        loss.backward()
        losses.append(loss.item())
    grads = {name: p.grad for name, p in peft.named_parameters() if p.requires_grad}
    return losses, grads, lora_np.functional.default_generator().bit_generator.state


def _assert_same_grads(plain, checkpointed):
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        a, b = plain[name], checkpointed[name]
        assert a is not None and b is not None, name
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        worst = np.unravel_index(diff.argmax(), a.shape)
        assert np.array_equal(a, b), f"{name}: max difference {diff.max()} at {worst}"


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_family_gets_the_plain_gradients_bit_for_bit(model_type):
    losses, plain, state = _accumulated_grads(_adapted(model_type))
    peft = _adapted(model_type)
    peft.gradient_checkpointing_enable()
    losses_gc, checkpointed, state_gc = _accumulated_grads(peft)
    assert losses_gc == losses
    assert state_gc == state  # the recomputation replayed the masks and put the generator back
    _assert_same_grads(plain, checkpointed)


def test_float32_and_a_trainable_embedding():
    """float32, and an input that requires grad (the embedding adapted too): its gradient flows through."""
    def run(gc):
        peft = _adapted("llama", dtype="float32", num_hidden_layers=3)
        peft.model.model.embed_tokens.weight.requires_grad = True
        if gc:
            peft.gradient_checkpointing_enable()
        return _accumulated_grads(peft)

    (losses, plain, _), (losses_gc, checkpointed, _) = run(False), run(True)
    assert losses == losses_gc and "base_model.model.model.embed_tokens.weight" in plain
    _assert_same_grads(plain, checkpointed)


def _graph_ops(tensor):
    """The types of the Functions in tensor's graph."""
    seen, stack, types = set(), [tensor._ctx], []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen or isinstance(node, Tensor):
            continue
        seen.add(id(node))
        types.append(type(node))
        stack.extend(node.next_nodes)
    return types


def test_only_training_with_grad_mode_checkpoints():
    peft = _adapted("llama", num_hidden_layers=3)
    peft.gradient_checkpointing_enable()
    ids = np.arange(10).reshape(2, 5)
    trained = peft(ids, labels=ids, return_logits=False).loss
    assert _graph_ops(trained).count(Checkpoint) == 3
    peft.eval()
    evaluated = peft(ids, labels=ids, return_logits=False).loss
    assert Checkpoint not in _graph_ops(evaluated)
    peft.train()
    with no_grad():
        assert peft(ids, labels=ids, return_logits=False).loss._ctx is None
    cache = KVCache()  # generation-style call: the cache must be filled once, so no checkpoint
    logits = peft(ids, cache=cache).logits
    assert Checkpoint not in _graph_ops(logits) and cache.seq_len() == 5


def _kept_and_peak(layers, gc):
    """(bytes kept from forward to backward, peak bytes of forward + backward) per tracemalloc."""
    peft = _adapted("llama", dtype="float32", num_hidden_layers=layers, hidden_size=64, intermediate_size=128,
                    max_position_embeddings=128, attention_dropout=0.0)
    if gc:
        peft.gradient_checkpointing_enable()
    ids = np.random.default_rng(0).integers(0, VOCAB, (4, 64))
    peft(ids, labels=ids, return_logits=False).loss.backward()  # first-call allocations (caches, tables) done
    for p in peft.parameters():
        p.grad = None
    tracemalloc.start()
    try:
        loss = peft(ids, labels=ids, return_logits=False).loss
        kept = tracemalloc.get_traced_memory()[0]
        loss.backward()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return kept, peak


def test_checkpointing_keeps_one_input_per_layer():
    block_input = 4 * 64 * 64 * 4  # B·T·C float32 numbers
    bookkeeping = 16 * 1024  # a Checkpoint node's Python objects: the node, its parameter list, the RNG state dict
    kept, peak = zip(*(_kept_and_peak(layers, gc) for gc in (False, True) for layers in (2, 4)))
    plain_per_layer, gc_per_layer = (kept[1] - kept[0]) / 2, (kept[3] - kept[2]) / 2
    assert block_input <= gc_per_layer <= block_input + bookkeeping, gc_per_layer
    assert plain_per_layer > 10 * block_input, plain_per_layer
    assert (peak[3] - peak[2]) / 2 <= block_input + bookkeeping
    assert peak[3] < peak[1] / 2, peak


def test_a_training_run_is_the_same_with_grad_checkpoint(tiny, tmp_path):
    devnull = open(os.devnull, "w")
    plain = train(tiny_train_args(tiny, tmp_path / "plain", steps=3, grad_accum=2), stream=devnull)
    gc = train(tiny_train_args(tiny, tmp_path / "gc", steps=3, grad_accum=2, grad_checkpoint=True), stream=devnull)
    assert gc["model"].is_gradient_checkpointing and not plain["model"].is_gradient_checkpointing
    assert [r["loss"] for r in gc["rows"]] == [r["loss"] for r in plain["rows"]]
    assert [r.get("val_loss") for r in gc["rows"]] == [r.get("val_loss") for r in plain["rows"]]
    a = lora_np.safetensors.load_file(tmp_path / "plain" / "adapter_model.safetensors")
    b = lora_np.safetensors.load_file(tmp_path / "gc" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_the_option_and_its_refusals(tmp_path):
    argv = ["train", "--data", "d.jsonl", "--out", str(tmp_path)]
    assert train_args_from_namespace(build_parser().parse_args(argv + ["--grad-checkpoint"])).grad_checkpoint is True
    assert train_args_from_namespace(build_parser().parse_args(argv)).grad_checkpoint is False
    with pytest.raises(OptionError, match="grad_checkpoint must be true or false, got 'yes'"):
        TrainArgs(data="d.jsonl", out=str(tmp_path), grad_checkpoint="yes")


def test_the_peft_wrapper_passes_the_methods_through():
    peft = _adapted("qwen3")
    assert not peft.is_gradient_checkpointing
    peft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert peft.is_gradient_checkpointing and peft.model.gradient_checkpointing
    peft.gradient_checkpointing_disable()
    assert not peft.model.is_gradient_checkpointing
    with pytest.raises(NotImplementedError, match=r"gradient_checkpointing_kwargs\['preserve_rng_state'\]"):
        peft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"preserve_rng_state": False})
    assert not peft.is_gradient_checkpointing


def test_checkpoint_refuses_an_argument_that_requires_grad():
    block = _adapted("llama").model.model.layers[0]
    h = Tensor(np.zeros((1, 3, 32)), requires_grad=True)
    with pytest.raises(ValueError, match="argument 1 after hidden_states requires grad"):
        checkpoint(block, h, Tensor(np.zeros(3), requires_grad=True))
