"""bench/trial_throughput.py: what each method's timed runs contain."""
from __future__ import annotations

import pytest
import torch

import bench.trial_throughput as throughput
from trainers.loop import DataCache
from trainers.workloads import DataOptions, Workload, get_workload


def test_strong_baseline_normalises_the_training_set_before_its_timed_trials(monkeypatch):
    """The strong baseline is documented as a TensorDataset over the training set
    normalised once up front: its timed trials must not normalise the whole training
    set again, trial after trial (batchlab's stacked path keeps its float copy from the
    warm-up too)."""
    args = throughput.parse_args(["--steps", "2", "--batch-sizes", "16", "--ks", "2", "--repeats", "2",
                                  "--sequential-trials", "2", "--no-vmap-rows"])
    warming = [False]
    real_warm_up = throughput.warm_up

    def flagged_warm_up(*a, **kw):
        warming[0] = True
        try:
            return real_warm_up(*a, **kw)
        finally:
            warming[0] = False
    monkeypatch.setattr(throughput, "warm_up", flagged_warm_up)
    timed_sizes = []
    real_preprocess = Workload.preprocess

    def counting_preprocess(self, x):
        if not warming[0]:
            timed_sizes.append(len(x))
        return real_preprocess(self, x)
    monkeypatch.setattr(Workload, "preprocess", counting_preprocess)
    cache = DataCache()
    train_size = cache.get(get_workload("digits_mlp"), DataOptions(None, False), torch.device("cpu")).train_size
    rows, _ = throughput.bench_cell("digits_mlp", 16, args, cache, {})
    assert [method for method, _ in rows][1].startswith("baseline, strong")
    assert timed_sizes, "the timed runs preprocess their batches and validation sets"
    assert train_size not in timed_sizes, timed_sizes


def test_the_header_says_which_arithmetic_each_method_runs(capsys):
    """On CUDA batchlab runs bf16 autocast by default and the baselines fp32: the same
    steps, not the same arithmetic, so the printed run must say so (on CPU all fp32)."""
    assert "bf16" in throughput.precision_note(torch.device("cuda"))
    assert "baselines fp32" in throughput.precision_note(torch.device("cuda"))
    throughput.main(["--steps", "2", "--batch-sizes", "16", "--ks", "2", "--repeats", "1",
                     "--sequential-trials", "1", "--no-vmap-rows"])
    header = capsys.readouterr().out.split("\n\n")[0]
    assert "precision: fp32 for every method" in header, header



def test_workloads_whose_work_the_baselines_do_not_reproduce_are_refused(capsys):
    """The baselines feed single-channel images without augmentation: on a CIFAR
    workload the typical baseline's PIL 'L' pipeline cannot even build its inputs, and
    batchlab would crop and flip every batch while neither baseline does (unequal work).
    Such a workload is a usage error (exit 2) naming why, before any data is read."""
    for name, reason in (("cifar10_resnet8", "augment"), ("nqm", "closed form"),
                         ("imagenet_resnet50", "DataLoader"), ("no_such", "unknown workload")):
        with pytest.raises(SystemExit) as exit_info:
            throughput.parse_args(["--workloads", f"mnist10k_mlp,{name}"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2
        assert name in err and reason in err, (name, err)
    args = throughput.parse_args(["--workloads", "digits_mlp,mnist10k_simple_cnn,mnist10k_f1"])
    assert args.workloads == "digits_mlp,mnist10k_simple_cnn,mnist10k_f1"
