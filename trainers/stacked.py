"""A fast path for stacked MLP trials: batched matmuls and ordinary autograd, no vmap.

`trainers.vectorized` trains K trials of a cell as one computation with torch.func
(`vmap` over `functional_call`). For the plain MLPs (`Flatten -> [Linear, ReLU]* ->
Linear`) that is mostly dispatch overhead on a CPU: every op goes through the vmap
batching rules, the functional optimizer allocates a fresh copy of every stacked tensor,
and a `torch.where` keeps stopped trials frozen. This module computes the same thing
directly on the stacked tensors, which keep `stack_module_state`'s layout (a Linear
weight is (K, out, in), its bias (K, out)):

- forward: `torch.baddbmm(bias, h, weight^T)` per Linear on (K, B, features) activations;
  the validation set, shared by all trials, goes through the first layer as one matmul;
- backward: ordinary autograd on the summed objective sum_k mean_loss_k (trials are
  independent, so each trial's gradient is its own mean-loss gradient);
- optimizer: torch.optim's formulas (the same as `trainers.vectorized._UPDATES`), written
  in place on the stacked tensors with the per-trial hyperparameters as (K, 1, ..., 1);
  plain momentum has the backward add the gradients straight into the scaled momentum
  buffers (`baddbmm_`): the largest tensors of a step are then written and read once less
  (a step at B = 16 about 12% faster with K = 8, 20% with K = 32, 2-core CPU);
- data: the training set is preprocessed (uint8 -> normalised float) once (the caller
  keeps it across groups) and every step gathers all K trials' batches with one
  `index_select` (preprocessing is elementwise, so the values equal per-batch
  preprocessing bit for bit); with augmentation, or a set over 512 MiB as floats, the
  uint8 batches are gathered and preprocessed per step instead;
- loss: for the plain mean cross-entropy of `Workload.loss` the last layer emits logits
  as (K, classes, B), so log-softmax runs vectorized over the batch rather than over 10
  classes per example, and the logits gradient (softmax - onehot) / B is written out;
  a workload with its own `loss` gets autograd through it up to the logits;
- stopped trials are not masked: the caller drops them from the stack at the evaluation
  that decides them (stops happen only there);
- sub-stacks: between two evaluations the caller trains the stack one cache-sized
  sub-stack of trials after another (`StackedTrainer.parts`, `_SUBSTACK_BYTES`), each
  through every step of the interval, and evaluation goes sub-stack by sub-stack too:
  trials are independent, and a sub-stack whose state stays in the CPU's cache trains
  faster than a large stack streamed from memory at every step.

Exactly the sequential trainer's semantics otherwise; results equal `run_trial`'s up to
floating-point rounding (tests/trainers/test_stacked.py). Models this does not cover
(batch norm, convolutions, anything but the layer types above) keep the vmap path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from trainers.workloads import Workload

# The training set is kept preprocessed (float32) when that copy is at most this big.
_MAX_PREPROCESSED_BYTES = 512 << 20
# Trials train (and evaluate) in sub-stacks whose parameters, gradients and optimizer
# state fit in this many bytes, half the 32 MiB L3 cache of the 2-core AMD EPYC measured:
# there a step of the MNIST MLP at B = 16 cost about the same per trial for K = 8 to 16
# (1.4 MiB of momentum-SGD state per trial), and 1.5x that at K = 32. In sub-stacks of 8,
# K = 32 trains as many trials/s as K = 8 at B = 16 (as a whole stack: 0.78x of K = 8's),
# and about as many as the whole stack at B = 128.
_SUBSTACK_BYTES = 16 << 20


@dataclass(frozen=True)
class StackedMLP:
    """The layer sequence of a covered model: ("flatten", None) / ("relu", None) /
    ("linear", (weight name, bias name or None))."""

    layers: tuple[tuple[str, tuple[str, str | None] | None], ...]

    @staticmethod
    def of(model: nn.Module) -> "StackedMLP | None":
        """The stacked form of `model`, or None where this fast path does not cover it."""
        from trainers.models.mlp import MLP
        if type(model) is MLP:
            body, prefix = model.net, "net."
        elif type(model) is nn.Sequential:
            body, prefix = model, ""
        else:
            return None
        if type(body) is not nn.Sequential or list(model.buffers()):
            return None
        layers: list = []
        for name, module in body.named_children():
            if type(module) is nn.Linear:
                bias = f"{prefix}{name}.bias" if module.bias is not None else None
                layers.append(("linear", (f"{prefix}{name}.weight", bias)))
            elif type(module) is nn.ReLU:
                layers.append(("relu", None))
            elif type(module) is nn.Flatten and module.start_dim == 1 and module.end_dim == -1:
                if layers:
                    return None  # only a leading flatten
                layers.append(("flatten", None))
            else:
                return None
        if not layers or layers[0][0] != "flatten" or layers[-1][0] != "linear":
            return None
        return StackedMLP(tuple(layers))

    def forward(self, params: dict[str, torch.Tensor], x: torch.Tensor,
                saved: list | None = None, classes_first: bool = False) -> torch.Tensor:
        """Logits (K, B, classes) of the K stacked models on x: (K, B, features), one batch
        per trial, or (B, features), one batch shared by all trials; (K, classes, B) with
        `classes_first` (x (K, B, features) only). With `saved` (a list), appends what
        `backward` needs: every Linear's input and every ReLU's output."""
        h = x
        last = len(self.layers) - 1
        for position, (kind, names) in enumerate(self.layers[1:], start=1):
            if saved is not None:
                saved.append(h)
            if kind == "relu":  # in place: backward needs a ReLU's output, not its input
                h = torch.relu_(h)
                continue
            weight_name, bias_name = names  # type: ignore[misc]
            weight = params[weight_name]  # (K, out, in)
            if classes_first and position == last:  # (K, out, in) @ (K, in, B)
                bias = params[bias_name].unsqueeze(2) if bias_name is not None else None
                h = (torch.baddbmm(bias, weight, h.transpose(1, 2)) if bias is not None
                     else torch.bmm(weight, h.transpose(1, 2)))
            elif h.dim() == 2:  # shared input: one matmul for every trial's first layer
                k, out_features = weight.shape[0], weight.shape[1]
                weights = weight.reshape(k * out_features, -1).t()  # (in, K * out)
                flat = (torch.addmm(params[bias_name].reshape(-1), h, weights) if bias_name is not None
                        else h @ weights)  # (B, K * out), with the bias as nn.Linear adds it
                h = flat.view(h.shape[0], k, out_features).transpose(0, 1)
            elif bias_name is not None:
                h = torch.baddbmm(params[bias_name].unsqueeze(1), h, weight.transpose(1, 2))
            else:
                h = torch.bmm(h, weight.transpose(1, 2))
        if saved is not None:
            saved.append(h)
        return h

    def backward(self, params: dict[str, torch.Tensor], saved: list, grad_logits: torch.Tensor,
                 classes_first: bool = False,
                 into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Gradients of every parameter (stacked layout) from d objective / d logits
        (K, B, classes), or (K, classes, B) with `classes_first`: autograd's formulas for
        Linear and ReLU, written out so the weight gradients come out contiguous in
        (K, out, in) and the first layer's input gradient is never formed.

        With `into` (parameter name -> a tensor of its stacked shape), every gradient is
        added to that tensor in place and `into` is returned: a weight gradient by its
        matmul itself (`baddbmm_`), so it is never written out and read back. The sum is
        the separate `into + gradient` bit for bit where the matmul does not split the
        batch axis into blocks (MKL on this CPU: batches up to 256 at least), otherwise
        equal up to rounding (the partial sums accumulate in `into`)."""
        grads: dict[str, torch.Tensor] = {}
        grad = grad_logits
        last = len(self.layers) - 1
        for position in range(last, 0, -1):
            kind, names = self.layers[position]
            if kind == "relu":  # saved[position] is the ReLU's output
                grad = torch.ops.aten.threshold_backward(grad, saved[position], 0)
                continue
            weight_name, bias_name = names  # type: ignore[misc]
            inputs = saved[position - 1]  # (K, B, in)
            out_first = classes_first and position == last  # grad (K, out, B)
            grad_t = grad if out_first else grad.transpose(1, 2)  # (K, out, B)
            if into is None:
                grads[weight_name] = torch.bmm(grad_t, inputs)  # (K, out, in)
            else:
                into[weight_name].baddbmm_(grad_t, inputs)
            if bias_name is not None:
                bias_grad = grad.sum(dim=2 if out_first else 1)  # (K, out)
                if into is None:
                    grads[bias_name] = bias_grad
                else:
                    into[bias_name].add_(bias_grad)
            if position > 1:
                grad = torch.bmm(grad.transpose(1, 2) if out_first else grad,
                                 params[weight_name])  # (K, B, in)
        if into is not None:
            return into
        return {name: grads[name] for name in params}


def preprocessed_train_x(workload: Workload, splits) -> torch.Tensor | None:
    """The whole training set as the model's float input, (N, features), computed once;
    None where training augments (per-step, per-trial) or the copy would be too big."""
    if workload.augment is not None or splits.train_x.numel() * 4 > _MAX_PREPROCESSED_BYTES:
        return None
    return workload.preprocess(splits.train_x).reshape(len(splits.train_x), -1)


def _per_trial(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def _by_rank(values: torch.Tensor, tensors) -> dict[int, torch.Tensor]:
    """(K,) values as a (K, 1, ..., 1) view per rank of `tensors` (stacked parameters:
    weights and biases, two ranks, however many layers)."""
    return {rank: values.view(-1, *([1] * (rank - 1))) for rank in {t.dim() for t in tensors}}


class StackedTrainer:
    """One group's stacked training step and evaluation (see the module docstring)."""

    def __init__(self, model: StackedMLP, workload: Workload, optimizer: str, splits,
                 preprocessed: torch.Tensor | None = None):
        """`preprocessed`: `preprocessed_train_x(workload, splits)` if the caller keeps it."""
        self.model, self.workload, self.optimizer = model, workload, optimizer
        self.train_y = splits.train_y
        self.train_x = splits.train_x
        self.preprocessed = preprocessed
        self.update: Callable = _INPLACE_UPDATES[optimizer]
        # The plain mean cross-entropy every registered workload uses gets a hand-written
        # loss gradient; a workload with its own `loss` gets autograd through it.
        self.cross_entropy = type(workload).loss is Workload.loss

    def parts(self, params: dict[str, torch.Tensor]) -> list[slice]:
        """The stack's trials as consecutive sub-stacks of near-equal size, as few as keep
        each within `_SUBSTACK_BYTES` of parameters, gradients and optimizer state (2 +
        the optimizer's state tensors per parameter) at a power of two trials or fewer
        (a stack of 32 in 4 of 8 rather than 3 of 11: the batched matmuls share a
        sub-stack's trials between the threads, evenly). One part off the CPU (a GPU
        runs the whole stack best as one computation)."""
        first = next(iter(params.values()))
        k = first.shape[0]
        if first.device.type != "cpu":
            return [slice(0, k)]
        per_trial = sum(p[0].numel() * p.element_size() for p in params.values()) * (2 + _STATE_TENSORS[self.optimizer])
        fitting = max(1, _SUBSTACK_BYTES // per_trial)
        count = -(-k // (1 << (fitting.bit_length() - 1)))  # sub-stacks
        size = -(-k // count)
        return [slice(start, min(start + size, k)) for start in range(0, k, size)]

    def batch(self, index: torch.Tensor, generators) -> tuple[torch.Tensor, torch.Tensor]:
        """Every trial's batch: index (K, b) -> x (K, b, features), y (K, b)."""
        k, b = index.shape
        flat = index.reshape(-1)
        y = self.train_y.index_select(0, flat).view(k, b)
        if self.preprocessed is not None:
            return self.preprocessed.index_select(0, flat).view(k, b, -1), y
        x = self.workload.preprocess(self.train_x.index_select(0, flat))  # (K*b, *input)
        x = x.view(k, b, *x.shape[1:])
        if self.workload.augment is not None:  # per-trial generator, as run_trial draws it
            x = torch.stack([self.workload.augment(x[i], g) for i, g in enumerate(generators)])
        return x.reshape(k, b, -1), y

    def step(self, params, opt_state, hparams, row, x, y) -> torch.Tensor:
        """One update of every stacked trial in place; returns the (K,) summed losses."""
        if self.cross_entropy:
            return self._step_cross_entropy(params, opt_state, hparams, row, x, y)
        k, b = y.shape
        saved: list = []
        with torch.no_grad():
            logits = self.model.forward(params, x, saved)  # (K, b, C)
        # The workload's own loss, differentiated by autograd, up to the logits only.
        with torch.enable_grad():
            logits = logits.requires_grad_(True)
            _, _, per_example = self.workload.loss(logits.reshape(k * b, -1), y.reshape(-1))
            loss_sums = per_example.view(k, b).sum(dim=1)  # (K,)
            grad_logits, = torch.autograd.grad(loss_sums.sum() / b, [logits])
        with torch.no_grad():
            # The last saved tensor is `logits` itself, whose gradient is grad_logits.
            self._backward_and_update(params, opt_state, hparams, row, saved, grad_logits)
        return loss_sums.detach()

    @torch.no_grad()
    def _step_cross_entropy(self, params, opt_state, hparams, row, x, y) -> torch.Tensor:
        """`step` for `Workload.loss` (mean cross-entropy), with the logits laid out
        (K, classes, B): log-softmax over a short class axis is then vectorized over the
        batch instead of running per example. d loss_mean / d logits = (softmax - onehot) / b,
        autograd's formula."""
        k, b = y.shape
        saved: list = []
        logits = self.model.forward(params, x, saved, classes_first=True)  # (K, C, b)
        log_probs = torch.log_softmax(logits, dim=1)
        target = y.unsqueeze(1)  # (K, 1, b)
        loss_sums = log_probs.gather(1, target).sum(dim=(1, 2)).neg_()  # (K,)
        grad = log_probs.exp_()
        grad.scatter_add_(1, target, torch.full(target.shape, -1.0, dtype=grad.dtype,
                                                device=grad.device))
        grad.div_(b)
        self._backward_and_update(params, opt_state, hparams, row, saved, grad, classes_first=True)
        return loss_sums

    def _backward_and_update(self, params, opt_state, hparams, row, saved, grad_logits,
                             classes_first: bool = False) -> None:
        """The gradients from d objective / d logits, then the optimizer's update in place.
        Plain momentum (no weight decay, no clipping) never forms the gradients: the buffers
        are scaled by the momentum and the backward adds the gradients into them,
        buf <- m * buf + g as torch.optim computes it, one pass over the gradients fewer."""
        if self.optimizer == "momentum" and "weight_decay" not in hparams and "grad_clip_norm" not in hparams:
            buffers = opt_state["momentum_buffer"]
            momentum = _by_rank(hparams["momentum"], params.values())
            neg_lr = _by_rank(row["lr"].neg(), params.values())
            for buf in buffers.values():
                buf.mul_(momentum[buf.dim()])
            self.model.backward(params, saved, grad_logits, classes_first, into=buffers)
            for n, p in params.items():
                p.addcmul_(neg_lr[p.dim()], buffers[n])
            return
        grads = self.model.backward(params, saved, grad_logits, classes_first)
        if "grad_clip_norm" in hparams:
            from trainers.vectorized import _clip_per_trial
            grads = _clip_per_trial(grads, hparams["grad_clip_norm"])
        self.update(params, grads, opt_state, hparams, row)

    @torch.no_grad()
    def evaluate(self, params, x: torch.Tensor, y: torch.Tensor,
                 batch_size: int) -> tuple[list[float], list[float]]:
        """Mean loss and error rate of each stacked model over a split, in the chunks of
        `batch_size` examples `trainers.loop.evaluate` uses, one sub-stack of trials
        (`parts`) at a time (the activations of a chunk of 2,000 MNIST images are 1 MiB
        per trial and layer: sub-stacks keep them nearer the cache too)."""
        k = next(iter(params.values())).shape[0]
        loss_sum = torch.zeros(k, device=y.device, dtype=torch.float64)
        wrong = torch.zeros(k, device=y.device, dtype=torch.int64)
        for start in range(0, len(y), batch_size):
            inputs = self.workload.preprocess(x[start:start + batch_size])
            inputs = inputs.reshape(len(inputs), -1)
            labels = y[start:start + batch_size]
            b = len(labels)
            for part in self.parts(params):
                logits = self.model.forward({n: p[part] for n, p in params.items()}, inputs)  # (k, b, C)
                _, _, per_example = self.workload.loss(logits.reshape(-1, logits.shape[2]),
                                                       labels.repeat(len(logits)))
                loss_sum[part] += per_example.view(-1, b).sum(dim=1).double()
                wrong[part] += (logits.argmax(dim=2) != labels).sum(dim=1)
        count = len(y)
        return [v / count for v in loss_sum.tolist()], [v / count for v in wrong.tolist()]


# --- in-place optimizer updates (torch.optim's formulas, per-trial hyperparameters) ----------

def _l2(grads, params, hp):
    if "weight_decay" not in hp:
        return grads
    return {n: g + _per_trial(hp["weight_decay"], g) * params[n] for n, g in grads.items()}


def _sgd(params, grads, state, hp, row):
    grads = _l2(grads, params, hp)
    for n, p in params.items():
        p.addcmul_(_per_trial(row["lr"], p).neg(), grads[n])


def _momentum(params, grads, state, hp, row, nesterov=False):
    grads = _l2(grads, params, hp)
    buffers = state["momentum_buffer"]
    for n, p in params.items():
        momentum = _per_trial(hp["momentum"], p)
        buf = buffers[n].mul_(momentum).add_(grads[n])
        direction = grads[n] + momentum * buf if nesterov else buf
        p.addcmul_(_per_trial(row["lr"], p).neg(), direction)


def _nesterov(params, grads, state, hp, row):
    _momentum(params, grads, state, hp, row, nesterov=True)


def _adam(params, grads, state, hp, row, decoupled=False):
    if not decoupled:
        grads = _l2(grads, params, hp)
    for n, p in params.items():
        g = grads[n]
        exp_avg = state["exp_avg"][n].lerp_(g, _per_trial(hp["one_minus_beta1"], p))
        exp_avg_sq = state["exp_avg_sq"][n].mul_(_per_trial(hp["beta2"], p)).add_(
            _per_trial(hp["one_minus_beta2"], p) * g * g)
        denom = exp_avg_sq.sqrt().div_(_per_trial(row["bias2_sqrt"], p)).add_(_per_trial(hp["epsilon"], p))
        if decoupled and "weight_decay" in hp:
            p.mul_(_per_trial(row["decay"], p))
        p.addcmul_(_per_trial(row["step_size"], p).neg(), torch.div(exp_avg, denom, out=denom))


def _adamw(params, grads, state, hp, row):
    _adam(params, grads, state, hp, row, decoupled=True)


# Optimizer state tensors per parameter.
_STATE_TENSORS = {"sgd": 0, "momentum": 1, "nesterov": 1, "adam": 2, "adamw": 2}

_INPLACE_UPDATES: dict[str, Callable] = {
    "sgd": _sgd, "momentum": _momentum, "nesterov": _nesterov, "adam": _adam, "adamw": _adamw}
