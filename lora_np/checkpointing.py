"""Gradient checkpointing (activation recomputation), as torch.utils.checkpoint.

`checkpoint(block, hidden_states, *args)` runs `block(hidden_states, *args)` without recording its graph:
the graph keeps only the block's input. In backward the block's forward runs again, this time with the
graph, from the same input and the same dropout RNG state, and the output's gradient goes back through
that graph. The recomputed forward does what the first one did, op for op, so every gradient equals the
plain path's bit for bit; a block's activations live only while its backward runs (memory of one block
instead of all of them, for one more forward per block).

CausalLM.gradient_checkpointing_enable() (lora_np.models.base) checkpoints every decoder block in training.
Dropout draws from lora_np.functional.default_generator(): its state is what gets replayed.
"""
from . import functional as F
from .tensor import Function, Tensor, enable_grad, is_grad_enabled, no_grad

__all__ = ["checkpoint"]


class Checkpoint(Function):
    """block(hidden_states, *args) recomputed in backward. The Function's inputs are hidden_states and the
    block's trainable parameters, so the graph reaches the adapter even when hidden_states needs no grad."""

    def forward(self, hidden_states, *param_arrays, block, params, args):
        generator = F.default_generator()
        self.block, self.params, self.args, self.hidden_states = block, params, args, hidden_states
        self.generator, self.rng_state = generator, generator.bit_generator.state
        with no_grad():
            return block(Tensor(hidden_states), *args).data

    def backward(self, g):
        h = Tensor(self.hidden_states, requires_grad=self.needs_input_grad[0])
        kept = [p.grad for p in self.params]  # earlier micro-batches' sums: the engine adds ours to them
        for p in self.params:
            p.grad = None
        state_now = self.generator.bit_generator.state
        self.generator.bit_generator.state = self.rng_state
        try:
            with enable_grad():
                out = self.block(h, *self.args)
            out.backward(g)
        finally:
            self.generator.bit_generator.state = state_now
            grads = [p.grad for p in self.params]
            for p, grad in zip(self.params, kept):
                p.grad = grad
        return (h.grad, *grads)


def checkpoint(block, hidden_states, *args):
    """block(hidden_states, *args), its activations recomputed in backward instead of kept. Only
    hidden_states and the block's parameters are differentiated: an argument in `args` that requires
    grad is refused (ValueError). Without grad mode it is block(hidden_states, *args)."""
    if not is_grad_enabled():
        return block(hidden_states, *args)
    for i, a in enumerate(args):
        if isinstance(a, Tensor) and a.requires_grad:
            raise ValueError(f"checkpoint: argument {i + 1} after hidden_states requires grad; only hidden_states "
                             "and the block's parameters get gradients through a checkpoint")
    params = [p for p in block.parameters() if p.requires_grad]
    return Checkpoint.apply(hidden_states, *params, block=block, params=params, args=args)
