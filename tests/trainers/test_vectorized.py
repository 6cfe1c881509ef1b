"""Vectorized trials equal sequential ones: measurements, outcomes, masking, updates, K."""
import dataclasses
import math
import os

import pytest
import torch

import trainers.vectorized as vectorized_module
from trainers.config import Target, TrialConfig, TrialResult
from trainers.loop import DataCache, run_trial
from trainers.loop import build_model
from tests.shared_data import MNIST_T10K
from trainers.vectorized import (_UPDATES, _Clock, _group_k, _hparam_tensors, _make_context, _make_stack,
                                 _StepOptions, _StepTables, _train_step, auto_k, choose_k,
                                 is_vectorizable, run_trials_vectorized)
from trainers.workloads import DataOptions, ModelOptions, get_workload

CACHE = DataCache()
CPU = torch.device("cpu")


def config(optimizer: str, hparams: dict, seed: int, **overrides) -> TrialConfig:
    values = dict(workload="digits_mlp", batch_size=64, optimizer=optimizer, schedule="constant",
                  hparams=hparams, max_steps=100, eval_every=10, target=Target("val_error", 0.04),
                  seed=seed, device="cpu")
    values.update(overrides)
    return TrialConfig(**values)


# One trial reaches the target early, one diverges (NaN), two run to the budget.
CELLS = {
    "momentum": [
        config("momentum", {"learning_rate": 0.3, "momentum": 0.9}, 5),
        config("momentum", {"learning_rate": 1e9, "momentum": 0.9}, 1),
        config("momentum", {"learning_rate": 0.01, "momentum": 0.9, "weight_decay": 1e-3,
                            "grad_clip_norm": 0.5}, 2),
        config("momentum", {"learning_rate": 0.02, "momentum": 0.5, "end_factor": 0.1}, 4,
               schedule="linear_decay"),
    ],
    "adam": [
        config("adam", {"learning_rate": 1e-2}, 5),
        config("adam", {"learning_rate": 1e20}, 1),
        config("adam", {"learning_rate": 1e-3, "weight_decay": 1e-3}, 2),
        config("adam", {"learning_rate": 1e-3, "beta1": 0.8, "beta2": 0.99}, 4),
    ],
}


def sequential(configs):
    runs = []
    for cfg in configs:
        measurements = []
        runs.append((run_trial(cfg, data_cache=CACHE, on_measurement=measurements.append), measurements))
    return runs


def vectorized(configs, **kwargs):
    measurements = [[] for _ in configs]
    results = run_trials_vectorized(configs, data_cache=CACHE,
                                    on_measurement=lambda i, m: measurements[i].append(m), **kwargs)
    return list(zip(results, measurements))


def assert_close(a: float, b: float, rtol: float = 1e-4) -> None:
    assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rtol, abs=1e-7)


def assert_same_runs(expected, actual):
    for (want, want_ms), (got, got_ms) in zip(expected, actual, strict=True):
        assert (got.outcome, got.steps, got.examples, got.steps_to_result, got.examples_to_result) == \
            (want.outcome, want.steps, want.examples, want.steps_to_result, want.examples_to_result)
        assert [(m.step, m.examples, m.epoch, m.batch_size) for m in got_ms] == \
            [(m.step, m.examples, m.epoch, m.batch_size) for m in want_ms]
        for w, g in zip(want_ms, got_ms):
            assert g.learning_rate == w.learning_rate
            assert g.val_error == pytest.approx(w.val_error, abs=1.5 / 300)  # at most one example
            for name in ("train_loss", "val_loss"):
                assert_close(getattr(g, name), getattr(w, name))


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "vmap"])
def test_vectorized_equals_sequential(optimizer, stacked):
    configs = CELLS[optimizer]
    expected = sequential(configs)
    outcomes = sorted(result.outcome for result, _ in expected)
    assert outcomes == ["diverged", "not_reached", "not_reached", "reached"]  # the cases we want
    assert_same_runs(expected, vectorized(configs, chunk_size=4, stacked=stacked))


def test_results_keep_caller_order_across_groups_and_fallbacks():
    lars = config("lars", {"learning_rate": 0.5}, 7, max_steps=20)
    configs = [dataclasses.replace(CELLS["adam"][0], max_steps=20), lars,
               config("momentum", {"learning_rate": 0.05, "momentum": 0.9}, 3, max_steps=20)]
    assert [is_vectorizable(c) for c in configs] == [True, False, True]
    assert_same_runs(sequential(configs), vectorized(configs))


def test_a_campaigns_val_size_is_the_vectorized_trials_validation_split_too():
    """val_size carves the validation split from train: such trials are grouped too, and
    evaluate on the same split as run_trial."""
    configs = [config("momentum", {"learning_rate": 0.05, "momentum": 0.9}, s, max_steps=20, val_size=200)
               for s in (1, 2)]
    assert all(is_vectorizable(c) for c in configs)
    expected = sequential(configs)
    default_split = sequential([dataclasses.replace(configs[0], val_size=None)])[0][1]
    assert [m.val_loss for m in default_split] != [m.val_loss for m in expected[0][1]]
    assert_same_runs(expected, vectorized(configs, stacked=False))


def test_pruned_like_run_trial():
    configs = [config("momentum", {"learning_rate": 0.01, "momentum": 0.9}, s, max_steps=60) for s in (1, 2)]
    got = vectorized(configs, best_so_far=lambda: 30)
    assert [(r.outcome, r.steps, ms[-1].step) for r, ms in got] == [("pruned", 30, 30)] * 2
    got = vectorized(configs, best_so_far=lambda: 30, prune=False)
    assert [(r.outcome, r.steps) for r, _ in got] == [("not_reached", 60)] * 2


def test_a_masked_trial_is_frozen():
    configs = [config("adam", {"learning_rate": 1e-2}, s) for s in (1, 2)]
    workload = get_workload("digits_mlp")
    splits = CACHE.get(workload, DataOptions(), CPU)
    models = [build_model(workload, c, CPU) for c in configs]
    context = _make_context(workload, CPU, splits, models[0], "adam", _StepOptions(False, None))
    stack = _make_stack(configs, [0, 1], models, CPU, splits.train_size)
    stack.active = torch.tensor([True, False])  # as a decided trial leaves it (mask and result)
    stack.trials[1].result = TrialResult("pruned", steps=0, examples=0, wall_seconds=0.0)
    before = {n: p.clone() for n, p in stack.params.items()}
    stack.orders = torch.stack([torch.randperm(splits.train_size, generator=g) for g in stack.generators])
    clock = _Clock()
    for start in (0, 64, 128):
        _train_step(context, stack, clock, start, 64)
        clock.step += 1
    for name, p in stack.params.items():
        assert torch.equal(p[1], before[name][1])  # stopped: bit for bit unchanged
        assert not torch.equal(p[0], before[name][0])
    assert all(torch.equal(s[1], torch.zeros_like(s[1]))
               for state in stack.opt_state.values() for s in state.values())


def test_a_compiled_step_compacts_to_powers_of_two_with_the_same_results(monkeypatch):
    """Three of six trials diverge at the first evaluation, one reaches the target later:
    exact compaction trains stacks of 6, 3 (then masks); a compiled step's compaction
    keeps one diverged trial (NaN weights) as masked padding, 6 -> 4 -> 2, and changes
    no number. Eager here: the policy is forced, not compiled."""
    lrs = (1e9, 0.3, 1e9, 0.01, 1e9, 0.02)
    configs = [config("momentum", {"learning_rate": lr, "momentum": 0.9}, seed)
               for seed, lr in zip((1, 5, 2, 3, 4, 6), lrs)]
    sizes: list[int] = []
    step_for = vectorized_module._step_for
    monkeypatch.setattr(vectorized_module, "_step_for",
                        lambda context, b, k, **kw: sizes.append(k) or step_for(context, b, k, **kw))
    exact = vectorized(configs, chunk_size=6, stacked=False)
    exact_sizes = sorted(set(sizes))
    sizes.clear()
    monkeypatch.setattr(vectorized_module, "_compiles_per_stack_size", lambda context, b: True)
    padded = vectorized(configs, chunk_size=6, stacked=False)
    assert [r.outcome for r, _ in exact] == ["diverged", "reached", "diverged", "not_reached",
                                            "diverged", "not_reached"]
    assert exact_sizes == [3, 6] and sorted(set(sizes)) == [2, 4, 6]
    assert_same_runs(exact, padded)
    monkeypatch.undo()
    workload = get_workload("digits_mlp")
    context = _make_context(workload, CPU, None, build_model(workload, configs[0], CPU), "momentum",
                            _StepOptions(False, None))
    assert not vectorized_module._compiles_per_stack_size(context, 64)  # eager: exact sizes
    compiled = dataclasses.replace(context, options=_StepOptions(True, None))
    assert vectorized_module._compiles_per_stack_size(compiled, 64)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "nesterov", "adam", "adamw"])
def test_functional_updates_match_torch_optim(optimizer):
    hparams = [{"learning_rate": 0.1, "momentum": 0.9, "weight_decay": 0.0},
               {"learning_rate": 0.03, "momentum": 0.5, "weight_decay": 0.01,
                "beta1": 0.8, "beta2": 0.99, "epsilon": 1e-6}]
    configs = [config(optimizer, h, i, max_steps=5) for i, h in enumerate(hparams)]
    from trainers.optim import get_optimizer
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(2, 3, 4, generator=generator)  # (K, 3, 4)
    references = [weights[k].clone().requires_grad_(True) for k in range(2)]
    optims = [get_optimizer(optimizer).build([p], c.hparams) for p, c in zip(references, configs)]
    params = {"w": weights.clone()}
    state = {s: {"w": torch.zeros_like(weights)} for s in
             {"momentum": ["momentum_buffer"], "nesterov": ["momentum_buffer"],
              "adam": ["exp_avg", "exp_avg_sq"], "adamw": ["exp_avg", "exp_avg_sq"]}.get(optimizer, [])}
    hp = _hparam_tensors(configs, CPU)
    tables = _StepTables(configs, 1000, CPU)
    for step in range(5):
        grads = torch.randn(2, 3, 4, generator=generator)
        for k in range(2):
            references[k].grad = grads[k].clone()
            optims[k].step()
        params, state = _UPDATES[optimizer](params, {"w": grads}, state, hp, tables.row(step))
    for k in range(2):
        torch.testing.assert_close(params["w"][k], references[k].detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("optimizer", ["momentum", "adamw"])
def test_step_tables_in_chunks_equal_the_whole_budget_at_once(optimizer):
    """Chunks of 4 steps (a schedule over the epochs of a 100-example set, batch 64: the
    epoch's last batch is 36) give the whole-budget table bit for bit, also after a
    compaction drops a trial mid-chunk."""
    hparams = [{"learning_rate": lr, "momentum": 0.9, "weight_decay": 1e-3, "end_factor": 0.1}
               for lr in (0.1, 0.03, 0.01)]
    configs = [config(optimizer, h, i, max_steps=30, schedule="linear_decay") for i, h in enumerate(hparams)]
    whole = _StepTables(configs, 100, CPU, chunk=1000)
    chunked = _StepTables(configs, 100, CPU, chunk=4)
    names = set(whole.row(0))
    assert names == ({"lr"} if optimizer == "momentum" else {"lr", "step_size", "bias2_sqrt", "decay"})
    for step in range(30):
        if step == 10:
            chunked = chunked.select([0, 2])
        want, got = whole.row(step), chunked.row(step)
        keep = [0, 1, 2] if step < 10 else [0, 2]
        for name in names:
            assert torch.equal(got[name], want[name][keep])
        assert chunked.lr(step) == [whole.lr(step)[k] for k in keep]
    assert len(chunked.tables["lr"]) <= 4 and chunked.end == 30
    assert whole.lr(29)[0] < whole.lr(0)[0]  # the schedule moves: a constant table would pass anything


def test_choose_k_shrinks_with_the_batch(monkeypatch):
    batches = [16, 128, 1024, 8192, 65536]
    for workload in ("digits_mlp", "mnist10k_mlp"):
        ks = [choose_k(workload, b, "cpu") for b in batches]
        assert all(1 <= k <= 16 for k in ks) and ks == sorted(ks, reverse=True)
    assert choose_k("mnist10k_mlp", 16, "cpu") > choose_k("mnist10k_mlp", 65536, "cpu")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 << 30, 80 << 30))
    ks = [choose_k("mnist10k_mlp", b, "cuda", max_k=64) for b in batches]
    assert ks[0] == 64 and ks == sorted(ks, reverse=True) and ks[-1] < 64


@pytest.mark.skipif(not torch.cuda.is_available() and not os.environ.get("BATCHLAB_COMPILE_TESTS"),
                    reason="compiling on CPU takes ~30 s; set BATCHLAB_COMPILE_TESTS=1 to run it")
def test_compiled_step_equals_eager():
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the compiled path users run
    configs = [config("adam", {"learning_rate": lr}, s, max_steps=40, device=device)
               for s, lr in ((1, 1e-3), (2, 3e-3))]
    eager = vectorized(configs, compile=False, precision="fp32")
    compiled = vectorized(configs, compile=True, precision="fp32")
    assert_same_runs(eager, compiled)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_compiled_trials_learn():
    configs = [config("momentum", {"learning_rate": 0.3, "momentum": 0.9}, s, device="cuda",
                      max_steps=100, target=Target("val_error", 0.0)) for s in (1, 2)]
    results = vectorized(configs)  # default on CUDA: tiered compilation, bf16 autocast
    assert all(r.outcome == "not_reached" and r.best_metric < 0.15 for r, _ in results)


@pytest.mark.skipif(not (MNIST_T10K / "t10k-images-idx3-ubyte.gz").exists(), reason="needs the MNIST t10k files")
def test_k_of_a_group_comes_from_the_datas_input_shape():
    """A convnet's model does not fix its input size: `choose_k` alone assumes 32 x 32, which
    breaks MNIST's simple CNN (28 x 28, FC over 7 x 7 x 64). The worker's call (no chunk
    size) takes the shape from the data, and the group trains."""
    workload = get_workload("mnist10k_simple_cnn")
    with pytest.raises(RuntimeError):
        choose_k(workload, 16, "cpu")
    configs = [TrialConfig(workload="mnist10k_simple_cnn", batch_size=16, optimizer="momentum",
                           schedule="constant", hparams={"learning_rate": 0.01 * (i + 1), "momentum": 0.9},
                           max_steps=2, eval_every=2, target=Target("val_error", 0.0), seed=i,
                           data_dir=str(MNIST_T10K)) for i in range(2)]
    cache = DataCache()
    assert _group_k(configs[0], cache, torch.device("cpu")) == \
        choose_k(workload, 16, "cpu", input_shape=(1, 28, 28)) >= 1
    results = run_trials_vectorized(configs, data_cache=cache)
    assert [r.steps for r in results] == [2, 2] and all(r.outcome == "not_reached" for r in results)
    # auto_k, the worker's K per cell: the same choice, and 1 where the trials would run
    # one at a time anyway (an optimizer the vectorized step does not have).
    mlp = dataclasses.replace(configs[0], workload="mnist10k_mlp")
    assert auto_k(configs[0], cache) == _group_k(configs[0], cache, torch.device("cpu"))
    assert auto_k(mlp, cache) == _group_k(mlp, cache, torch.device("cpu")) > 1
    assert auto_k(dataclasses.replace(mlp, optimizer="lars"), cache) == 1


def test_compiled_steps_of_many_groups_are_not_capped_by_dynamos_recompile_limit():
    """Groups compile closures of one function: dynamo counts them against one code
    object's recompile limit (8), after which it silently runs eager. A worker's compiled
    contexts raise the limit; checked here with the eager backend (no codegen, fast)."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    from trainers.vectorized import allow_recompiles

    def build(scale):
        def step(x):
            return (x * scale).sum()
        return step

    def compiled_graphs(count: int) -> int:
        dynamo.reset()
        counters.clear()
        for i in range(count):
            torch.compile(build(float(i)), backend="eager", dynamic=False)(torch.ones(2 + i))
        return counters["stats"]["unique_graphs"]

    # The limits' names before torch 2.6: cache_size_limit, accumulated_cache_size_limit.
    renamed = hasattr(dynamo.config, "recompile_limit")
    limits = ({"recompile_limit": 8, "accumulated_recompile_limit": 256} if renamed else
              {"cache_size_limit": 8, "accumulated_cache_size_limit": 256})
    with dynamo.config.patch(**limits):
        assert compiled_graphs(12) == 8  # the default: the last 4 ran uncompiled
        allow_recompiles()
        assert compiled_graphs(12) == 12
    dynamo.reset()


def _has_dropout(workload) -> bool:
    with torch.device("meta"):
        model = workload.build_model(ModelOptions())
    return any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


def test_workloads_with_dropout_train_sequentially_with_run_trials_masks(monkeypatch):
    """run_trial draws dropout masks from global RNG streams seeded per trial; vmap cannot
    draw the same masks, so such models are never vectorized: run_trials_vectorized hands
    them to run_trial and its measurements are run_trial's, bit for bit."""
    import trainers.workloads as workloads_module
    with_dropout = {name for name, w in workloads_module.WORKLOADS.items()
                    if w.simulate is None and _has_dropout(w)}
    assert {"cifar10_c1", "imagenet64_vgg11", "imagenet_vgg11"} <= with_dropout
    assert not any(is_vectorizable(config("momentum", {"learning_rate": 0.1, "momentum": 0.9}, 0,
                                          workload=name)) for name in with_dropout)
    dropout_mlp = lambda options: torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 10))
    workload = dataclasses.replace(get_workload("digits_mlp"), name="digits_dropout", build_model=dropout_mlp)
    monkeypatch.setattr(workloads_module, "WORKLOADS", {**workloads_module.WORKLOADS, "digits_dropout": workload})
    configs = [config("momentum", {"learning_rate": lr, "momentum": 0.9}, seed, workload="digits_dropout",
                      max_steps=30) for lr, seed in ((0.1, 1), (0.03, 2))]
    expected = sequential(configs)
    torch.rand(3)  # other use of the global RNG in between changes nothing
    actual = vectorized(configs, chunk_size=2)
    assert [[(m.train_loss, m.val_loss) for m in ms] for _, ms in actual] == \
        [[(m.train_loss, m.val_loss) for m in ms] for _, ms in expected]


@pytest.mark.parametrize("hparams", [{"learning_rate": 0.1, "momentum": 0.0},
                                     {"learning_rate": 0.1, "momentum": -0.5}])
def test_both_trainers_refuse_invalid_hyperparameters_before_training(hparams):
    """run_trial's optimizer (torch.optim.SGD) refuses nesterov without momentum and a
    negative momentum; the vectorized update would train them. run_trial raises before it
    trains; the vectorized trainer fails that trial with the same message, at once, and
    trains the others of its call."""
    bad = config("nesterov", hparams, 1, max_steps=10)
    good = config("nesterov", {"learning_rate": 0.1, "momentum": 0.5}, 1, max_steps=10)
    with pytest.raises(ValueError) as sequential_error:
        run_trial(bad, data_cache=CACHE)
    assert str(sequential_error.value).startswith("optimizer 'nesterov': ")
    measured, told = [], []
    results = run_trials_vectorized([good, bad, good], data_cache=CACHE, chunk_size=2,
                                    on_measurement=lambda i, m: measured.append(i),
                                    on_result=lambda i, r: told.append(i))
    assert [r.outcome for r in results] == ["not_reached", "failed", "not_reached"]
    assert results[1] == TrialResult("failed", 0, 0, 0.0, message=str(sequential_error.value))
    assert told[0] == 1 and sorted(told) == [0, 1, 2]  # the refused trial first, before any training
    assert set(measured) == {0, 2}
