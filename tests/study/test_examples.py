"""Every campaign file in examples/ is a valid spec, and none asks for a batch size larger
than its workload's training set, which `batchlab campaign create` refuses once the data
is there (the full datasets are not on every machine, so the size is the one the workload
registry states: "(55,000 train / ...)")."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from study.spec import load_spec
from trainers.workloads import WORKLOADS

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").rglob("*.toml"))


def _stated_train_size(workload: str) -> int | None:
    match = re.search(r"\(([\d,]+) train\b", WORKLOADS[workload].description)
    return int(match.group(1).replace(",", "")) if match else None


def test_the_registry_states_the_training_set_sizes_it_is_checked_by():
    assert _stated_train_size("mnist_simple_cnn") == 55_000
    assert _stated_train_size("fashion_mnist_simple_cnn") == 55_000
    assert _stated_train_size("cifar10_resnet8") == 45_000
    assert _stated_train_size("mnist10k_mlp") == 8_000


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_example_spec_loads_and_its_batch_sizes_fit_the_training_set(path):
    spec = load_spec(path)
    train_size = _stated_train_size(spec.workload)
    if train_size is not None:
        too_large = [b for b in spec.batch_sizes if b > train_size]
        assert not too_large, f"{path.name}: batch sizes {too_large} > {train_size} training examples"
