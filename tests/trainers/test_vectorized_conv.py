"""Convnets at large per-trial batches train and evaluate their K trials in a loop of plain
convolutions instead of vmap's grouped ones: the same numbers, and the choice of when."""
import dataclasses

import pytest
import torch
from torch import nn

import trainers.vectorized as vectorized_module
import trainers.workloads as workloads_module
from trainers.config import Target, TrialConfig
from trainers.loop import DataCache, build_model, run_trial
from trainers.vectorized import _loops_trials, evaluate_stacked, run_trials_vectorized
from trainers.workloads import DataOptions, get_workload

CACHE = DataCache()
CPU = torch.device("cpu")


def _digits_cnn(options):
    """8x8 digits -> conv 3x3 (6) + batch norm + ReLU + max-pool -> linear 10."""
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(6 * 4 * 4, 10))


@pytest.fixture(autouse=True)
def digits_cnn(monkeypatch):
    workload = dataclasses.replace(get_workload("digits_mlp"), name="digits_cnn", build_model=_digits_cnn)
    monkeypatch.setattr(workloads_module, "WORKLOADS", {**workloads_module.WORKLOADS, "digits_cnn": workload})
    return workload


def config(lr, seed, **overrides):
    values = dict(workload="digits_cnn", batch_size=32, optimizer="momentum", schedule="constant",
                  hparams={"learning_rate": lr, "momentum": 0.9}, max_steps=40, eval_every=10,
                  target=Target("val_error", 0.12), seed=seed, device="cpu")
    return TrialConfig(**{**values, **overrides})


def runs(configs, vectorize=True):
    measurements = [[] for _ in configs]
    if vectorize:
        results = run_trials_vectorized(configs, data_cache=CACHE, chunk_size=len(configs), stacked=False,
                                        on_measurement=lambda i, m: measurements[i].append(m))
    else:
        results = [run_trial(c, data_cache=CACHE, on_measurement=measurements[i].append)
                   for i, c in enumerate(configs)]
    return [(r.outcome, r.steps, [(m.step, m.train_loss, m.val_loss, m.val_error) for m in ms])
            for r, ms in zip(results, measurements)]


def assert_same(expected, actual):
    for (outcome, steps, want), (got_outcome, got_steps, got) in zip(expected, actual, strict=True):
        assert (got_outcome, got_steps) == (outcome, steps)
        for w, g in zip(want, got, strict=True):
            assert g[0] == w[0] and g[3] == pytest.approx(w[3], abs=1.5 / 300)
            assert g[1:3] == pytest.approx(w[1:3], rel=1e-4, nan_ok=True)


def test_the_loop_is_for_convnets_at_large_batches():
    cnn = get_workload("mnist_simple_cnn").build_model(None)
    mlp = get_workload("mnist10k_mlp").build_model(None)
    cuda, cpu = torch.device("cuda"), CPU
    assert _loops_trials(cnn, 1024, cuda) and _loops_trials(cnn, 16384, cuda)
    assert not _loops_trials(cnn, 512, cuda) and not _loops_trials(mlp, 16384, cuda)
    assert _loops_trials(cnn, 64, cpu) and not _loops_trials(cnn, 32, cpu)
    assert not _loops_trials(mlp, 4096, cpu)
    assert _loops_trials(cnn, 1024, torch.device("meta")) and not _loops_trials(cnn, 512, torch.device("meta"))


def test_looped_trials_equal_vmapped_and_sequential(monkeypatch):
    # One reaches the target early, one diverges, one runs to the budget; batch norm's
    # running statistics are per trial in both ways.
    configs = [config(0.05, 1), config(1e20, 2), config(0.002, 3)]
    sequential = runs(configs, vectorize=False)
    assert [(outcome, steps) for outcome, steps, _ in sequential] == \
        [("reached", 30), ("diverged", 10), ("not_reached", 40)]
    vmapped = runs(configs)
    calls = []
    looped_fn = vectorized_module._looped_grads_fn

    def counting(*args):
        fn = looped_fn(*args)
        return lambda *a: calls.append(1) or fn(*a)
    monkeypatch.setattr(vectorized_module, "_looped_grads_fn", counting)
    monkeypatch.setitem(vectorized_module._CONV_LOOP_MIN_BATCH, "cpu", 32)
    looped = runs(configs)
    # Every step of the group, the epoch's last batch of 13 (1,197 = 37 x 32 + 13) included:
    # the path follows the cell's batch size, not the batch's.
    assert len(calls) == 40
    assert_same(sequential, vmapped)
    assert_same(sequential, looped)


def test_looped_trials_hand_their_convolutions_channels_last_weights_where_run_trial_does(monkeypatch):
    """On CUDA run_trial's model is channels_last, and the loop gives each trial's
    convolutions that layout too. Checked here with the CUDA rule applied on the CPU: every
    convolution of the loop (training and evaluation) gets channels_last weights, and the
    trials train as they do with the default layout."""
    configs = [config(0.05, 1), config(0.002, 3)]
    monkeypatch.setitem(vectorized_module._CONV_LOOP_MIN_BATCH, "cpu", 32)
    default = runs(configs)
    layouts = []
    conv2d = torch.nn.functional.conv2d

    def recording(inputs, weight, *args, **kwargs):
        layouts.append(weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last))
        return conv2d(inputs, weight, *args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "conv2d", recording)
    monkeypatch.setattr(vectorized_module, "_memory_format",
                        lambda t, device: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)
    channels_last = runs(configs)
    assert len(layouts) > 70 and all(layouts)  # 2 x 30 steps, 1 x 10 (one reached), evaluations
    assert_same(default, channels_last)


def test_looped_evaluation_equals_vmapped_and_autocasts(monkeypatch, digits_cnn):
    configs = [config(0.05, seed) for seed in (1, 2, 3)]
    models = [build_model(digits_cnn, c, CPU) for c in configs]
    for model in models:  # running statistics away from their initial values
        model.train()
        model(torch.randn(64, 1, 8, 8) * 3 + 1)
    params, buffers = torch.func.stack_module_state(models)
    splits = CACHE.get(digits_cnn, DataOptions(), CPU)
    skeleton = _digits_cnn(None).to("meta")
    args = (skeleton, digits_cnn, params, buffers, splits.val_x, splits.val_y, 128)
    monkeypatch.setitem(vectorized_module._CONV_LOOP_MIN_BATCH, "cpu", 129)
    vmapped = evaluate_stacked(*args)
    monkeypatch.setitem(vectorized_module._CONV_LOOP_MIN_BATCH, "cpu", 128)
    looped = evaluate_stacked(*args)
    assert looped[0] == pytest.approx(vmapped[0], rel=1e-5) and looped[1] == vmapped[1]
    # Under bf16 autocast (what run_trial evaluates with on CUDA) every trial's numbers are
    # its own model's under the same autocast, not the fp32 ones.
    low = evaluate_stacked(*args, torch.bfloat16)
    for k, model in enumerate(models):
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = torch.cat([model(digits_cnn.preprocess(splits.val_x[s:s + 128]))
                                for s in range(0, 300, 128)])
        loss = digits_cnn.loss(logits, splits.val_y)[0].item() / 300
        assert low[0][k] == pytest.approx(loss, rel=1e-3)
        assert low[0][k] != vmapped[0][k]


def test_a_compiled_context_runs_the_loop_eagerly(monkeypatch):
    """The loop is never handed to torch.compile (one compilation per stack size of K
    unrolled models, for no gain measured); the vmapped step still is."""
    from torch._dynamo.utils import counters
    configs = [config(0.05, 1, max_steps=10), config(0.002, 3, max_steps=10)]
    run = lambda: run_trials_vectorized(configs, data_cache=CACHE, chunk_size=2, compile=True,
                                        precision="fp32", stacked=False)
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setitem(vectorized_module._CONV_LOOP_MIN_BATCH, "cpu", 32)
    compiled_loop = run()
    assert counters["stats"]["calls_captured"] == 0  # dynamo traced nothing
    monkeypatch.setitem(vectorized_module._CONV_LOOP_MIN_BATCH, "cpu", 33)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(fn) or fn)
    calls = []
    eager_vmap = run()
    assert len(calls) == 1  # the vmapped step is still compiled
    assert [r.steps for r in compiled_loop] == [r.steps for r in eager_vmap] == [10, 10]
