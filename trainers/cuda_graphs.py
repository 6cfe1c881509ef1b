"""A functional training step replayed from captured CUDA graphs.

A small step (a few dozen trials of a small batch) is bound by kernel launches, not by
arithmetic: the vectorized step of 32 MNIST trials at B = 16 launches hundreds of
kernels of a few microseconds each. A CUDA graph captures the step's kernels once and
replays them with one launch. A graph replays fixed addresses, so `GraphedStep` keeps the
trials' state (parameters, buffers, optimizer state, hyperparameters) in static tensors
that the captured step updates in place, and copies each step's inputs (the per-step
scalars, the batch, the running mask) into static inputs before a replay.

The steps it replays write their new state into the state they are given
(`writing_back` makes one from a functional step: its new tensors are copied back). A
functional step compiled in that form writes in place for free: inductor stores the
optimizer's update straight into the static tensors, where a copy after the compiled
step would read and write the whole state once more (for 32 simple-CNN trials, 3.3 M
weights and as many momentum values each, ~1.7 GB per step; measured on an H100, the
compiled step with graphs was 8% to 16% slower than without them).

The static state is also how a new group of trials starts: its freshly initialised
state is copied into the same tensors (`adopt`), so a worker's groups of one stack size
reuse one set of device tensors and the graphs captured for them, instead of allocating
and capturing again.

One `GraphedStep` serves one stack size K (the state's leading dimension). It captures
one graph per input shape (the cell's batch, an epoch's shorter last batch), per
masking variant (every trial running, or a mask) and per step function (compiled or
not), all drawing their intermediates from one memory pool: they run one at a time and
keep their outputs alive, so they can share it. Off CUDA (the CPU tests) the same
in-place step runs eagerly, without a graph.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

Tree = dict  # name -> tensor, or name -> (name -> tensor): params, buffers, opt_state, hparams

# Eager runs before a capture, on a side stream: the compiled step's first calls compile,
# and libraries (cuBLAS, cuDNN) pick their algorithms and allocate workspaces there, which
# must not happen inside a capture. The step is functional, so these runs change nothing.
_WARMUP_RUNS = 3


def _structure(tree: Tree) -> tuple:
    return tuple((name, _structure(value)) if isinstance(value, dict) else
                 (name, tuple(value.shape), value.dtype) for name, value in tree.items())


def _clone(tree: Tree) -> Tree:
    return {name: _clone(value) if isinstance(value, dict) else value.clone()
            for name, value in tree.items()}


def _copy_into(static: Tree, values: Tree) -> None:
    for name, target in static.items():
        if isinstance(target, dict):
            _copy_into(target, values[name])
        else:
            target.copy_(values[name])


def writing_back(step: Callable) -> Callable:
    """The in-place form of a functional step: `step_into(params, buffers, opt_state,
    hparams, row, x, y, active) -> loss_sums`, the new params, buffers and optimizer state
    copied into the given ones."""
    def step_into(params, buffers, opt_state, hparams, row, x, y, active):
        *new_state, loss_sums = step(params, buffers, opt_state, hparams, row, x, y, active)
        for static, values in zip((params, buffers, opt_state), new_state):
            _copy_into(static, values)
        return loss_sums
    return step_into


@dataclass
class _Inputs:
    """A graph's static inputs: the per-step scalars, the batch, the running mask."""

    row: dict[str, torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    active: torch.Tensor | None

    def load(self, row, x, y, active) -> None:
        _copy_into(self.row, row)
        self.x.copy_(x)
        self.y.copy_(y)
        if self.active is not None:
            self.active.copy_(active)


@dataclass
class _Replay:
    inputs: _Inputs
    run: Callable[[], torch.Tensor]  # replays (or, uncaptured, runs) the step; the loss sums


class GraphedStep:
    """An in-place step, `step_into(params, buffers, opt_state, hparams, row, x, y, active)
    -> loss_sums` (`writing_back` of trainers.vectorized's functional step, or that
    compiled), called as the functional step is, `(params, buffers, opt_state, hparams,
    row, x, y, active) -> (params, buffers, opt_state, loss_sums)`, with the state kept in
    static tensors updated in place and the step replayed from a CUDA graph on CUDA.

    A call whose params, buffers or opt_state are not this object's static dicts adopts
    them first: their values (and the hparams') are copied into the static tensors. The
    returned dicts are the static ones; keep passing them. The loss sums are a static
    output too, overwritten by the next call: read them before. `step=` records a variant
    from another in-place step on the same state (the uncompiled step, for an epoch's
    shorter last batch or a variant not compiled yet). `captured` counts the graphs
    captured; a variant that cannot be captured runs uncaptured, with a warning."""

    def __init__(self, step: Callable, device: torch.device):
        self.step, self.device = step, device
        self.state: tuple[Tree, Tree, Tree, Tree] | None = None  # params, buffers, opt_state, hparams
        self._replays: dict[tuple, _Replay] = {}
        self._pool = None
        self.captured = 0

    def __call__(self, params, buffers, opt_state, hparams, row, x, y, active, step: Callable | None = None):
        state = self.state
        if state is None or params is not state[0] or buffers is not state[1] or opt_state is not state[2]:
            self.adopt(params, buffers, opt_state, hparams)
        step = step or self.step
        key = (tuple(x.shape), x.dtype, tuple(y.shape), active is None, step)
        replay = self._replays.get(key)
        if replay is None:
            replay = self._replays[key] = self._record(step, row, x, y, active)
        replay.inputs.load(row, x, y, active)
        loss_sums = replay.run()
        params, buffers, opt_state, _ = self.state
        return params, buffers, opt_state, loss_sums

    def adopt(self, params: Tree, buffers: Tree, opt_state: Tree, hparams: Tree) -> None:
        """Make this state the static state: copied into the static tensors where they
        exist with the same structure (a new group of trials, or a compacted stack, of
        this size), else allocated (and every graph captured so far dropped)."""
        trees = (params, buffers, opt_state, hparams)
        if self.state is not None and tuple(map(_structure, self.state)) == tuple(map(_structure, trees)):
            for static, values in zip(self.state, trees):
                _copy_into(static, values)
            return
        self.state = tuple(_clone(tree) for tree in trees)  # type: ignore[assignment]
        self._replays.clear()
        self._pool = None

    def _record(self, step: Callable, row, x, y, active) -> _Replay:
        inputs = _Inputs(_clone(row), x.clone(), y.clone(), None if active is None else active.clone())
        static_inputs = (inputs.row, inputs.x, inputs.y, inputs.active)
        body = lambda: step(*self.state, *static_inputs)
        if self.device.type != "cuda":
            return _Replay(inputs, body)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            scratch = [_clone(tree) for tree in self.state[:3]]  # the step writes into these
            for _ in range(_WARMUP_RUNS):
                step(*scratch, self.state[3], *static_inputs)
            del scratch
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                loss_sums = body()
        except RuntimeError as exc:  # an operation that cannot be captured: run this variant eagerly
            warnings.warn(f"CUDA graph capture of the training step failed ({exc}); "
                          f"this step shape runs without a graph", RuntimeWarning, stacklevel=3)
            return _Replay(inputs, body)
        if self._pool is None:
            self._pool = graph.pool()
        self.captured += 1

        def replay() -> torch.Tensor:
            graph.replay()
            return loss_sums
        return _Replay(inputs, replay)
