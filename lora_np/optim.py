"""Optimizers, learning-rate schedules and gradient clipping, matching PyTorch and transformers.

Optimizers (torch.optim semantics, the single-tensor code path of torch 2.13):

    opt = AdamW(model.parameters(), lr=2e-4, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=10, num_training_steps=1000)
    for step in range(1000):
        loss = model(ids, labels=labels)        # one micro-batch ...
        loss.backward()                         # ... accumulates into p.grad (+=)
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()

Gradient accumulation is simply not calling `zero_grad()` between micro-batches:
`backward()` adds into `.grad`. Scale each micro-batch's loss by 1/accum_steps (as
transformers' Trainer does) so the sum is the mean over the whole batch.

Parameters are anything with `.data` (a float32/float64 ndarray) and `.grad` (an
ndarray of the same shape and dtype, or None); a parameter whose `.grad` is None is
skipped, as torch does. Updates are in place on `p.data`, in its dtype; optimizer state
(moments, step counts) lives in `opt.state[i]`, `i` being the parameter's position across
all param groups, exactly how torch numbers it in `state_dict()`.

Checkpoints: `opt.state_dict()` is torch's layout (`{"state": {i: {...}}, "param_groups":
[{..., "params": [i, ...]}]}`); `flatten_state_dict` turns it into arrays for a
safetensors file plus a JSON-able dict, and `unflatten_state_dict` turns them back.
Schedulers' `state_dict()` is JSON-able as it is.
"""
import math

import numpy as np

__all__ = [
    "Optimizer", "AdamW", "SGD",
    "LambdaLR", "get_constant_schedule_with_warmup", "get_linear_schedule_with_warmup",
    "get_cosine_schedule_with_warmup",
    "clip_grad_norm_", "flatten_state_dict", "unflatten_state_dict",
]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class Optimizer:
    """Base class: param groups, per-parameter state, zero_grad, state_dict.

    params: an iterable of parameters, or of dicts `{"params": [...], "lr": ..., ...}`
    (param groups); a group's keys override `defaults`. Subclasses implement
    `_update(param, grad, state, group)` for one parameter.
    """

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        self.param_groups = []
        self.state = {}
        groups = [params] if isinstance(params, dict) else list(params)
        if not groups:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, group):
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"{type(self).__name__}: a param group is a dict with a 'params' key, got {group!r}")
        params = group["params"]
        params = [params] if hasattr(params, "data") else list(params)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for k, p in enumerate(params):
            if not hasattr(p, "data") or not hasattr(p, "grad"):
                raise TypeError(f"{type(self).__name__}: param group {len(self.param_groups)} item {k} "
                                f"is a {type(p).__name__}, not a parameter")
            if not isinstance(p.data, np.ndarray) or p.data.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"{type(self).__name__}: param group {len(self.param_groups)} item {k} "
                                f"has dtype {getattr(p.data, 'dtype', None)}; only float32/float64 are optimized")
            if id(p) in seen:
                raise ValueError(f"{type(self).__name__}: a parameter appears in more than one place "
                                 f"(param group {len(self.param_groups)} item {k})")
            seen.add(id(p))
        self.param_groups.append({**self.defaults, **group, "params": params})

    def _indexed_params(self):
        """(index across all groups, group, param), in torch's state_dict numbering."""
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield i, group, p
                i += 1

    def zero_grad(self, set_to_none=True):
        """Forget gradients: `.grad = None` (torch's default), or fill them with zeros."""
        for _, _, p in self._indexed_params():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.fill(0)

    def step(self):
        """Update every parameter that has a gradient, in place."""
        for i, group, p in self._indexed_params():
            if p.grad is None:
                continue
            if p.grad.shape != p.data.shape or p.grad.dtype != p.data.dtype:
                raise ValueError(f"{type(self).__name__}: parameter {i}: grad {p.grad.shape} {p.grad.dtype} "
                                 f"does not match data {p.data.shape} {p.data.dtype}")
            self._update(p.data, p.grad, self.state.setdefault(i, {}), group)

    def _update(self, param, grad, state, group):  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self):
        """torch's layout: {"state": {i: {name: ndarray or int}}, "param_groups": [{..., "params": [i...]}]}."""
        state = {i: {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in s.items()}
                 for i, s in self.state.items() if s}
        groups, start = [], 0
        for group in self.param_groups:
            n = len(group["params"])
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": list(range(start, start + n))})
            start += n
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore moments, step counts and hyperparameters (lr included), checking shapes.

        Arrays are copied and cast to each parameter's dtype; the parameters themselves
        are not touched (load them from the model checkpoint).
        """
        name = type(self).__name__
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{name}.load_state_dict: {len(saved_groups)} param groups saved, "
                             f"{len(self.param_groups)} in this optimizer")
        for g, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{name}.load_state_dict: param group {g} has {len(saved['params'])} "
                                 f"parameters saved, {len(group['params'])} here")
        params = {i: p for i, _, p in self._indexed_params()}
        state = {}
        for key, saved in state_dict["state"].items():
            i = int(key)
            if i not in params:
                raise ValueError(f"{name}.load_state_dict: state for parameter {i}, but there are only "
                                 f"{len(params)} parameters")
            p = params[i].data
            entry = {}
            for k, v in saved.items():
                if isinstance(v, np.ndarray):
                    if v.shape != p.shape:
                        raise ValueError(f"{name}.load_state_dict: state[{i}][{k!r}] has shape {v.shape}, "
                                         f"parameter {i} has shape {p.shape}")
                    v = v.astype(p.dtype, copy=True)
                entry[k] = v
            state[i] = entry
        for saved, group in zip(saved_groups, self.param_groups):
            group.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items() if k != "params"})
        self.state = state


class AdamW(Optimizer):
    """AdamW (Loshchilov & Hutter) with torch's exact order of operations.

    Per step t, for each parameter θ with gradient g:
        θ ← θ·(1 − lr·weight_decay)                 (decoupled weight decay)
        m ← lerp(m, g, 1 − β1);  v ← v·β2 + (1 − β2)·g·g
        θ ← θ − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + eps)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        if not lr >= 0.0:
            raise ValueError(f"AdamW: invalid learning rate {lr}")
        if not eps >= 0.0:
            raise ValueError(f"AdamW: invalid eps {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW: invalid betas {betas}; each must be in [0, 1)")
        if not weight_decay >= 0.0:
            raise ValueError(f"AdamW: invalid weight_decay {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _update(self, param, grad, state, group):
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if not state:
            state["step"] = 0
            state["exp_avg"] = np.zeros_like(param)
            state["exp_avg_sq"] = np.zeros_like(param)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        step = float(state["step"])

        if weight_decay != 0:
            param *= 1 - lr * weight_decay
        _lerp_(exp_avg, grad, 1 - beta1)
        exp_avg_sq *= beta2
        exp_avg_sq += (1 - beta2) * grad * grad

        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = lr / bias_correction1
        denom = np.sqrt(exp_avg_sq) / bias_correction2 ** 0.5
        denom += eps
        param += (-step_size * exp_avg) / denom


class SGD(Optimizer):
    """SGD with optional momentum, dampening, Nesterov and (coupled) weight decay, as torch.

        g ← g + weight_decay·θ
        buf ← g (first step) | buf·momentum + (1 − dampening)·g
        g ← g + momentum·buf (nesterov) | buf
        θ ← θ − lr·g
    """

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        if not lr >= 0.0:
            raise ValueError(f"SGD: invalid learning rate {lr}")
        if not momentum >= 0.0:
            raise ValueError(f"SGD: invalid momentum {momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"SGD: invalid weight_decay {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    def _update(self, param, grad, state, group):
        momentum, dampening = group["momentum"], group["dampening"]
        if group["weight_decay"] != 0:
            grad = grad + group["weight_decay"] * param
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.copy()
            else:
                buf *= momentum
                buf += (1 - dampening) * grad
            grad = grad + momentum * buf if group["nesterov"] else buf
        param += -group["lr"] * grad


def _lerp_(start, end, weight):
    """start ← start + weight·(end − start) in place, with torch.lerp's two formulas.

    For |weight| ≥ 0.5 torch computes end − (end − start)·(1 − weight), which is exact at weight 1.
    """
    weight = start.dtype.type(weight)
    if abs(weight) < 0.5:
        start += weight * (end - start)
    else:
        start[...] = end - (end - start) * (1 - weight)


# -- learning-rate schedules ----------------------------------------------------------------------

class LambdaLR:
    """torch.optim.lr_scheduler.LambdaLR: group lr = initial lr · lr_lambda(last_epoch).

    Construction sets each group's "initial_lr" (once) and takes the first step, so the
    lr is already lr_lambda(0)·initial lr; call `step()` after each `optimizer.step()`.
    lr_lambda: one function of the step count, or a list with one per param group.
    """

    def __init__(self, optimizer, lr_lambda, last_epoch=-1):
        self.optimizer = optimizer
        groups = optimizer.param_groups
        if last_epoch == -1:
            for group in groups:
                group.setdefault("initial_lr", group["lr"])
        else:
            for g, group in enumerate(groups):
                if "initial_lr" not in group:
                    raise KeyError(f"LambdaLR: param group {g} has no 'initial_lr'; resuming with "
                                   f"last_epoch={last_epoch} needs the optimizer's state loaded first")
        self.base_lrs = [group["initial_lr"] for group in groups]
        if callable(lr_lambda):
            self.lr_lambdas = [lr_lambda] * len(groups)
        else:
            self.lr_lambdas = list(lr_lambda)
            if len(self.lr_lambdas) != len(groups):
                raise ValueError(f"LambdaLR: {len(groups)} param groups but {len(self.lr_lambdas)} lr_lambdas")
        self.last_epoch = last_epoch
        self.step()

    def step(self):
        self.last_epoch += 1
        self._last_lr = [base_lr * lmbda(self.last_epoch) for lmbda, base_lr in zip(self.lr_lambdas, self.base_lrs)]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr

    def get_last_lr(self):
        return list(self._last_lr)

    def state_dict(self):
        """JSON-able: the step count, base lrs and the current lrs (not the lambdas)."""
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs), "last_lr": list(self._last_lr)}

    def load_state_dict(self, state_dict):
        """Restore the position; the optimizer's group lrs are set to the saved current lrs too."""
        self.last_epoch = int(state_dict["last_epoch"])
        self.base_lrs = list(state_dict["base_lrs"])
        self._last_lr = list(state_dict["last_lr"])
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr


def _warmup(current_step, num_warmup_steps):
    return float(current_step) / float(max(1, num_warmup_steps))


def get_constant_schedule_with_warmup(optimizer, num_warmup_steps, last_epoch=-1):
    """lr rises linearly from 0 over `num_warmup_steps`, then stays at the initial lr."""
    def lr_lambda(current_step):
        if current_step < num_warmup_steps:
            return _warmup(current_step, num_warmup_steps)
        return 1.0

    return LambdaLR(optimizer, lr_lambda, last_epoch)


def get_linear_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps, last_epoch=-1):
    """Linear warmup from 0, then linear decay to 0 at `num_training_steps` (transformers' formula)."""
    def lr_lambda(current_step):
        if current_step < num_warmup_steps:
            return _warmup(current_step, num_warmup_steps)
        return max(0.0, float(num_training_steps - current_step)
                   / float(max(1, num_training_steps - num_warmup_steps)))

    return LambdaLR(optimizer, lr_lambda, last_epoch)


def get_cosine_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps, num_cycles=0.5,
                                    last_epoch=-1):
    """Linear warmup from 0, then 0.5·(1 + cos(2π·num_cycles·progress)) (half a cosine down to 0 by default)."""
    def lr_lambda(current_step):
        if current_step < num_warmup_steps:
            return _warmup(current_step, num_warmup_steps)
        progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))

    return LambdaLR(optimizer, lr_lambda, last_epoch)


# -- gradient clipping ------------------------------------------------------------------------------

def clip_grad_norm_(params, max_norm, error_if_nonfinite=False):
    """Scale all gradients in place so that their global L2 norm is at most `max_norm`.

    As torch.nn.utils.clip_grad_norm_: total = ‖(‖g₁‖, ‖g₂‖, ...)‖₂ over the parameters
    with a gradient; every gradient is multiplied by min(1, max_norm / (total + 1e-6)).
    Returns the total norm before clipping (a float).
    """
    params = [params] if hasattr(params, "grad") else list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norms = np.array([np.linalg.norm(g.ravel()) for g in grads], dtype=np.result_type(*grads))
    total = np.linalg.norm(norms)
    if error_if_nonfinite and not np.isfinite(total):
        raise RuntimeError(f"clip_grad_norm_: the total norm of the gradients is {float(total)}")
    clip_coef = min(total.dtype.type(max_norm) / (total + total.dtype.type(1e-6)), 1.0)
    if clip_coef < 1.0 or not np.isfinite(clip_coef):
        for g in grads:
            g *= clip_coef
    return float(total)


# -- checkpoint helpers -----------------------------------------------------------------------------

def flatten_state_dict(state_dict):
    """Split an optimizer state_dict into (arrays, meta).

    arrays: {"state.<i>.<name>": ndarray}, ready for a safetensors file.
    meta: JSON-able: {"state": {"<i>": {name: number}}, "param_groups": [...]} (tuples become lists).
    """
    arrays, scalars = {}, {}
    for i, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, np.ndarray):
                arrays[f"state.{i}.{name}"] = value
            else:
                scalars.setdefault(str(i), {})[name] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}
              for group in state_dict["param_groups"]]
    return arrays, {"state": scalars, "param_groups": groups}


def unflatten_state_dict(arrays, meta):
    """Inverse of `flatten_state_dict`: an optimizer state_dict for `load_state_dict`."""
    state = {}
    for key, value in arrays.items():
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit():
            raise ValueError(f"unflatten_state_dict: unexpected array key {key!r} (want 'state.<i>.<name>')")
        state.setdefault(int(parts[1]), {})[parts[2]] = value
    for i, entry in meta["state"].items():
        state.setdefault(int(i), {}).update(entry)
    return {"state": state, "param_groups": [dict(group) for group in meta["param_groups"]]}
