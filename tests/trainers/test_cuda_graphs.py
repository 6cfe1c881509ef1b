"""The graphed step (trainers.cuda_graphs) computes what the plain vmapped step computes,
and a group's steps take the compiled or uncompiled step as the options say.

On the CPU the static-state bookkeeping runs uncaptured: adopting a new group's state in
place, one replay per batch shape and masking variant, a state of another stack size.
On CUDA the captured graphs give the same trials as the step without them."""
import dataclasses
import math
import os

import pytest
import torch

import trainers.vectorized as vectorized_module
from trainers.cuda_graphs import GraphedStep, writing_back
from trainers.loop import DataCache, build_model
from trainers.vectorized import (_CompileTiers, _Context, _make_context, _make_stack, _Sinks, _StepOptions,
                                 run_trials_vectorized)
from trainers.workloads import DataOptions, get_workload

from test_vectorized import CELLS, assert_same_runs, config, vectorized

CACHE = DataCache()
CPU = torch.device("cpu")
WORKLOAD = get_workload("digits_mlp")


def _stack(configs, context=None):
    splits = CACHE.get(WORKLOAD, DataOptions(), CPU)
    models = [build_model(WORKLOAD, c, CPU) for c in configs]
    if context is None:
        context = _make_context(WORKLOAD, CPU, splits, models[0], configs[0].optimizer, _StepOptions(False, None))
    stack = _make_stack(configs, list(range(len(configs))), models, CPU, splits.train_size)
    stack.orders = torch.stack([torch.randperm(splits.train_size, generator=g) for g in stack.generators])
    return context, stack, splits


def _inputs(stack, splits, step, start, size):
    index = stack.orders[:, start:start + size]
    return stack.tables.row(step), WORKLOAD.preprocess(splits.train_x[index]), splits.train_y[index]


def _drive(step_fn, stack, splits, active_from: int):
    """Eight steps: full batches of 64, a short one of 40, then with trial 1 masked."""
    state = (stack.params, stack.buffers, stack.opt_state)
    losses = []
    for step, (start, size) in enumerate([(0, 64), (64, 64), (128, 40)] + [(192 + 64 * i, 64) for i in range(5)]):
        row, x, y = _inputs(stack, splits, step, start, size)
        active = torch.tensor([True, False, True]) if step >= active_from else None
        *state, loss = step_fn(*state, stack.hparams, row, x, y, active)
        losses.append(loss.clone())
    return state, losses


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for name, value in tree.items():
        out.update(_flat(value, f"{prefix}{name}.") if isinstance(value, dict) else {prefix + name: value})
    return out


def _assert_equal_states(a, b):
    """(params, buffers, opt_state) bit for bit."""
    for tree_a, tree_b in zip(a, b, strict=True):
        flat_a, flat_b = _flat(tree_a), _flat(tree_b)
        assert flat_a.keys() == flat_b.keys()
        for name in flat_a:
            assert torch.equal(flat_a[name], flat_b[name]), name


def _cell(seeds, lrs):
    return [config("momentum", {"learning_rate": lr, "momentum": 0.9}, s) for s, lr in zip(seeds, lrs)]


def test_graphed_state_equals_the_plain_step_across_groups_shapes_and_masks():
    first = _cell((1, 2, 3), (0.1, 0.05, 0.02))
    context, stack, splits = _stack(first)
    graphed = GraphedStep(writing_back(context.step_fn), CPU)
    want_state, want_losses = _drive(context.step_fn, stack, splits, active_from=5)
    _, stack, _ = _stack(first, context)  # the same trials again, from their initial state
    got_state, got_losses = _drive(graphed, stack, splits, active_from=5)
    _assert_equal_states(want_state, got_state)
    assert all(torch.equal(w, g) for w, g in zip(want_losses, got_losses, strict=True))
    # one replay per (batch shape, masking): (64, all), (40, all), (64, masked)
    assert len(graphed._replays) == 3 and graphed.captured == 0  # no capture off CUDA
    addresses = [t.data_ptr() for t in graphed.state[0].values()]

    # A new group of the same size: its state is copied into the same tensors.
    second = _cell((4, 5, 6), (0.2, 0.01, 0.03))
    _, stack, _ = _stack(second, context)
    want_state, _ = _drive(context.step_fn, stack, splits, active_from=3)
    _, stack, _ = _stack(second, context)
    got_state, _ = _drive(graphed, stack, splits, active_from=3)
    _assert_equal_states(want_state, got_state)
    assert [t.data_ptr() for t in graphed.state[0].values()] == addresses
    assert got_state[0] is graphed.state[0] and len(graphed._replays) == 3

    # A state of another shape replaces the static one and its replays.
    _, stack, _ = _stack(second[:2], context)
    row, x, y = _inputs(stack, splits, 0, 0, 64)
    want = context.step_fn(stack.params, stack.buffers, stack.opt_state, stack.hparams, row, x, y, None)
    got = graphed(stack.params, stack.buffers, stack.opt_state, stack.hparams, row, x, y, None)
    _assert_equal_states(want[:3], got[:3])
    assert len(graphed._replays) == 1 and next(iter(graphed.state[0].values())).shape[0] == 2


@pytest.mark.skipif(not torch.cuda.is_available() and not os.environ.get("BATCHLAB_COMPILE_TESTS"),
                    reason="compiling on CPU takes ~1 min; set BATCHLAB_COMPILE_TESTS=1 to run it")
def test_the_compiled_in_place_step_equals_the_compiled_functional_one():
    """What graphs replay when compiled (the step with its write-back, compiled as one)
    trains as the compiled functional step does, and leaves no copy of the state behind."""
    configs = _cell((1, 2, 3), (0.1, 0.05, 0.02))
    splits = CACHE.get(WORKLOAD, DataOptions(), CPU)
    model = build_model(WORKLOAD, configs[0], CPU)
    context = _make_context(WORKLOAD, CPU, splits, model, "momentum", _StepOptions(True, None, graphs=True))
    _, stack, _ = _stack(configs, context)
    want_state, want_losses = _drive(context.step_fn, stack, splits, active_from=5)
    _, stack, _ = _stack(configs, context)
    graphed = GraphedStep(context.step_into_fn, CPU)
    got_state, got_losses = _drive(graphed, stack, splits, active_from=5)
    for tree_want, tree_got in zip(want_state, got_state, strict=True):
        flat_want, flat_got = _flat(tree_want), _flat(tree_got)
        assert flat_want.keys() == flat_got.keys()
        for name in flat_want:
            torch.testing.assert_close(flat_got[name], flat_want[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack(got_losses), torch.stack(want_losses), rtol=1e-5, atol=1e-6)
    assert got_state[0] is graphed.state[0] and len(graphed._replays) == 3


def _run_group(configs, options):
    """trainers.vectorized's group loop with explicit step options (graphs off CUDA run the
    static-state step uncaptured)."""
    measurements = [[] for _ in configs]
    steps = {}
    sinks = _Sinks(lambda i, m: measurements[i].append(m), None, lambda: None, True)
    results = vectorized_module._run_group(configs, list(range(len(configs))), CACHE, sinks, options, steps)
    return list(zip(results, measurements)), steps


def test_a_group_through_the_static_state_step_equals_the_plain_one():
    # One trial reaches the target, one diverges (masked, then compacted): 4 -> 2 trials.
    configs = CELLS["momentum"]
    plain, _ = _run_group(configs, _StepOptions(False, None))
    graphed, steps = _run_group(configs, _StepOptions(False, None, graphs=True))
    assert_same_runs(plain, graphed)
    assert sorted(r.outcome for r, _ in graphed) == ["diverged", "not_reached", "not_reached", "reached"]
    context = next(v for v in steps.values() if isinstance(v, _Context))
    assert sorted(context.graphed) == [2, 4]  # the compacted stack has its own static state


def test_graphs_are_for_small_vmapped_steps_and_need_cuda():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        run_trials_vectorized(_cell((1,), (0.1,)), data_cache=CACHE, cuda_graphs=True)
    assert _StepOptions.resolve(torch.device("cuda"), None, "auto").graphs
    assert not _StepOptions.resolve(torch.device("cuda"), None, "auto", cuda_graphs=False).graphs
    assert not _StepOptions.resolve(CPU, None, "auto").graphs
    configs = _cell((1, 2), (0.1, 0.1))
    context, _, _ = _stack(configs)
    context = dataclasses.replace(context, options=_StepOptions(False, None, graphs=True))
    small = vectorized_module._step_for(context, vectorized_module._GRAPH_MAX_BATCH, 2)
    assert isinstance(small, GraphedStep) and vectorized_module._step_for(context, 16, 2) is small
    assert vectorized_module._step_for(context, 16, 3) is not small  # one per stack size
    for k in (3, 4, 5, 2, 6):  # 3 is then the least recently used: freed for 6
        vectorized_module._step_for(context, 16, k)
    assert list(context.graphed) == [4, 5, 2, 6]
    assert len(context.graphed) == vectorized_module._GRAPHED_STACK_SIZES
    assert vectorized_module._step_for(context, vectorized_module._GRAPH_MAX_BATCH + 1, 2) is context.step_fn


def test_the_compiled_step_is_for_full_batches_and_when_tiered_for_long_running_variants():
    eager, _, _ = _stack(_cell((1, 2), (0.1, 0.1)))
    compiled = dataclasses.replace(eager, step_fn=torch.compile(eager.step_fn),  # never called here
                                   step_into_fn=torch.compile(eager.step_into_fn),
                                   options=_StepOptions(True, None))
    step_for = vectorized_module._step_for
    assert step_for(compiled, 64, 2) is step_for(compiled, 64, 2, masked=True) is compiled.step_fn
    assert compiled.step_fn is not compiled.eager_step_fn
    assert step_for(compiled, 64, 2, short=True) is compiled.eager_step_fn  # the epoch's last batch
    assert step_for(eager, 64, 2) is step_for(eager, 64, 2, short=True) is eager.step_fn is eager.eager_step_fn
    # tiered: every variant starts uncompiled and is compiled once it has spent 40 s
    tiered = dataclasses.replace(compiled, options=_StepOptions(True, None, tiered=True), tiers=_CompileTiers())
    assert step_for(tiered, 64, 2) is tiered.eager_step_fn
    tiered.tiers.spend((64, 2, False), 25.0)
    tiered.tiers.spend((64, 2, True), 25.0)
    tiered.tiers.spend((64, 2, False), 15.0)
    assert step_for(tiered, 64, 2) is tiered.step_fn and tiered.tiers.compiled == {(64, 2, False)}
    assert step_for(tiered, 64, 2, masked=True) is step_for(tiered, 64, 4) is step_for(tiered, 32, 2) \
        is step_for(tiered, 64, 2, short=True) is tiered.eager_step_fn
    tiered.tiers.spend((64, 2, False), 100.0)  # compiled: no longer counted
    assert tiered.tiers.eager_seconds == {(64, 2, False): 40.0, (64, 2, True): 25.0}
    # graphs: one static state per stack size, a variant per step function
    graphed = dataclasses.replace(compiled, options=_StepOptions(True, None, graphs=True))
    full, short = step_for(graphed, 64, 2), step_for(graphed, 64, 2, short=True)
    assert isinstance(full, GraphedStep) and full.step is compiled.step_into_fn and short.func is full
    assert short.keywords == {"step": compiled.eager_step_into_fn}


def _step_choices(monkeypatch) -> list[tuple]:
    """(stack size, masked, short batch, compiled step) of every step a group takes."""
    choices = []
    step_for = vectorized_module._step_for

    def spy(context, batch_size, k, short=False, masked=False):
        step = step_for(context, batch_size, k, short=short, masked=masked)
        choices.append((k, masked, short, step is context.step_fn and context.options.compile))
        return step
    monkeypatch.setattr(vectorized_module, "_step_for", spy)
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic=False: lambda *args: fn(*args))  # a new object
    return choices


@pytest.mark.parametrize("threshold", [0.0, math.inf])
def test_tiered_compilation_runs_a_variant_uncompiled_until_it_has_spent_the_threshold(monkeypatch, threshold):
    configs = CELLS["momentum"]  # evaluations every 10 steps; stacks of 4, 4 masked, 2
    choices = _step_choices(monkeypatch)
    plain, _ = _run_group(configs, _StepOptions(False, None))
    monkeypatch.setattr(vectorized_module, "_EAGER_SECONDS_BEFORE_COMPILING", threshold)
    choices.clear()
    tiered, steps = _run_group(configs, _StepOptions(True, None, tiered=True))
    assert_same_runs(plain, tiered)
    by_variant: dict[tuple, list[bool]] = {}
    for k, masked, short, compiled in choices:
        assert not (short and compiled)
        if not short:
            by_variant.setdefault((k, masked), []).append(compiled)
    # (4, False) runs one interval: the diverged trial stops at the first evaluation
    assert {v: len(f) for v, f in by_variant.items()} == {(4, False): 10, (4, True): 47, (2, False): 38}
    uncompiled = {}
    for variant, flags in by_variant.items():
        uncompiled[variant] = flags.index(True) if True in flags else len(flags)
        assert flags == [False] * uncompiled[variant] + [True] * (len(flags) - uncompiled[variant])
    if threshold == 0.0:  # compiled from its second interval on (the first: 10 steps, or 9 + a short one)
        assert uncompiled == {(4, False): 10, (4, True): 9, (2, False): 10}
    else:
        assert uncompiled == {v: len(f) for v, f in by_variant.items()}
    context = next(v for v in steps.values() if isinstance(v, _Context))
    assert context.tiers.compiled == ({(64, k, masked) for k, masked in by_variant} if threshold == 0.0 else set())


def test_untiered_compilation_compiles_every_full_batch(monkeypatch):
    choices = _step_choices(monkeypatch)
    _run_group(CELLS["momentum"], _StepOptions(True, None))
    assert {compiled for _, _, short, compiled in choices if not short} == {True}
    assert {compiled for _, _, short, compiled in choices if short} == {False}


def test_a_graphed_step_records_another_step_function_on_the_same_state():
    configs = _cell((1, 2), (0.1, 0.1))
    context, stack, splits = _stack(configs)
    calls = []
    other = writing_back(lambda *args: calls.append(tuple(args[5].shape[:2])) or context.step_fn(*args))  # x: (K, b, ...)
    graphed = GraphedStep(writing_back(context.step_fn), CPU)
    state = (stack.params, stack.buffers, stack.opt_state)
    want = state
    for start, size, step in ((0, 64, None), (64, 36, other), (100, 64, None), (164, 36, other)):
        row, x, y = _inputs(stack, splits, start // 64, start, size)
        want = context.step_fn(*want[:3], stack.hparams, row, x, y, None)
        state = graphed(*state[:3], stack.hparams, row, x, y, None, step=step)
        _assert_equal_states(want[:3], state[:3])
    # two variants; off CUDA a replay runs its step: the other one, on each short batch only
    assert calls == [(2, 36)] * 2 and len(graphed._replays) == 2


@pytest.mark.skipif(not torch.cuda.is_available() and not os.environ.get("BATCHLAB_COMPILE_TESTS"),
                    reason="compiling on CPU takes ~1 min; set BATCHLAB_COMPILE_TESTS=1 to run it")
def test_tiered_in_place_steps_share_one_static_state_off_cuda_too(monkeypatch):
    """CUDA's default path without the capture: threshold 0, so each variant's first
    interval runs the uncompiled in-place step and the rest the compiled one, both on one
    GraphedStep's static state; the trials are the plain ones."""
    monkeypatch.setattr(vectorized_module, "_EAGER_SECONDS_BEFORE_COMPILING", 0.0)
    configs = CELLS["momentum"]
    plain, _ = _run_group(configs, _StepOptions(False, None))
    tiered, steps = _run_group(configs, _StepOptions(True, None, graphs=True, tiered=True))
    assert_same_runs(plain, tiered)
    context = next(v for v in steps.values() if isinstance(v, _Context))
    assert context.tiers.compiled and context.step_into_fn is not context.eager_step_into_fn
    assert any(len({key[-1] for key in g._replays}) == 2 for g in context.graphed.values())


def _cuda(configs, **overrides):
    return [dataclasses.replace(c, device="cuda", **overrides) for c in configs]


def _captured(steps: dict) -> int:
    return sum(g.captured for v in steps.values() if isinstance(v, _Context) for g in v.graphed.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_cuda_graphs_equal_the_step_without_them(compile):
    configs = _cuda(CELLS["momentum"]) + _cuda(CELLS["adam"])
    # stacked=False: eager fp32 MLPs would otherwise take trainers.stacked's path, no graphs
    options = dict(chunk_size=4, compile=compile, precision="fp32", stacked=False)
    without = vectorized(configs, cuda_graphs=False, **options)
    steps: dict = {}
    with_graphs = vectorized(configs, cuda_graphs=True, step_cache=steps, **options)
    assert_same_runs(without, with_graphs)
    # per optimizer: K = 4 (full and last batch, then masked) and the compacted K = 2
    assert _captured(steps) >= 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_by_default_bf16_learn_and_reuse_their_state():
    configs = _cuda(_cell((1, 2, 3, 4), (0.3, 0.2, 0.1, 0.05)), max_steps=100)
    steps: dict = {}
    first = vectorized(configs, chunk_size=4, step_cache=steps)  # CUDA defaults: tiered, bf16, graphs
    captured = _captured(steps)
    assert captured >= 1 and all(r.best_metric < 0.2 for r, _ in first)
    again = vectorized(configs, chunk_size=4, step_cache=steps)  # same shapes: no new capture
    assert _captured(steps) == captured
    assert [(r.outcome, r.steps) for r, _ in again] == [(r.outcome, r.steps) for r, _ in first]
    for (_, want), (_, got) in zip(first, again):
        assert [m.val_error for m in got] == [m.val_error for m in want]  # deterministic replays


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiered_compilation_on_cuda_replays_both_steps_on_one_static_state(monkeypatch):
    """Threshold 0: each variant's first interval replays the uncompiled step's graph, the
    rest the compiled step's, in the same GraphedStep; the trials are the eager ones."""
    monkeypatch.setattr(vectorized_module, "_EAGER_SECONDS_BEFORE_COMPILING", 0.0)
    configs = _cuda(CELLS["momentum"])
    options = dict(chunk_size=4, precision="fp32", stacked=False)
    eager = vectorized(configs, compile=False, cuda_graphs=False, **options)
    steps: dict = {}
    tiered = vectorized(configs, step_cache=steps, **options)  # CUDA defaults: tiered, graphs
    assert_same_runs(eager, tiered)
    context = next(v for v in steps.values() if isinstance(v, _Context))
    assert context.options.tiered and context.tiers.compiled
    assert any(len({key[-1] for key in g._replays}) == 2 for g in context.graphed.values())
