"""Every registered workload trains a few steps on CPU through `run_trial`, on small
files generated in the real formats (IDX, CIFAR pickle batches, a JPEG ImageFolder
tree) or, for the MNIST-10k variants, on the real MNIST test files."""
import math

import pytest

from tests.trainers.test_datasets import write_cifar, write_idx_dataset, write_image_folder
from trainers.config import Target, TrialConfig
from trainers.data.fashion_mnist import FASHION_MNIST_FILES
from trainers.data.mnist import MNIST_FILES
from trainers.loop import run_trial
from trainers.workloads import WORKLOADS

from tests.shared_data import MNIST_T10K

T10K = str(MNIST_T10K)
pytestmark = pytest.mark.slow
VAL_SIZE = {"MNIST": 10, "FashionMNIST": 10, "cifar": 8, "imagenet": 3}


def data_dir_for(name: str, root, monkeypatch) -> tuple[str | None, int | None]:
    """Write the workload's dataset in its real layout; return (data_dir, val_size)."""
    if name == "digits_mlp" or name == "nqm":
        return None, None
    if name.startswith("mnist10k"):
        return T10K, None
    if name.startswith(("mnist", "fashion")):
        folder = "FashionMNIST" if name.startswith("fashion") else "MNIST"
        write_idx_dataset(root, folder, sizes=(("train", 40), ("t10k", 12)))
        for gz in (root / folder / "raw").glob("*.gz"):
            gz.unlink()  # unpacked generated files, read without the originals' md5s:
        for table in (MNIST_FILES, FASHION_MNIST_FILES):
            for file_name in [n for n in table if not n.endswith(".gz")]:
                monkeypatch.delitem(table, file_name)
        return str(root), VAL_SIZE[folder]
    if name.startswith(("cifar10_", "cifar100_")):
        import trainers.data.cifar as cifar
        monkeypatch.setattr(cifar, "check_md5", lambda path, md5: None)  # generated files
        if name.startswith("cifar100"):
            write_cifar(root, "cifar-100-python", {"train": 30, "test": 10}, "fine_labels", 100)
        else:
            files = {f"data_batch_{i}": 6 for i in range(1, 6)} | {"test_batch": 10}
            write_cifar(root, "cifar-10-batches-py", files, "labels", 10)
        return str(root), VAL_SIZE["cifar"]
    if name.startswith("imagenet"):
        write_image_folder(root, {"train": 4, "val": 2})
        return str(root), VAL_SIZE["imagenet"]
    raise AssertionError(f"no fixture for workload {name!r}: add one")


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workload_trains_a_few_steps(name, tmp_path, monkeypatch):
    workload = WORKLOADS[name]
    data_dir, val_size = data_dir_for(name, tmp_path, monkeypatch)
    if workload.simulate is not None:
        pytest.skip("closed-form workload: covered by the NQM tests")
    config = TrialConfig(workload=name, batch_size=4, optimizer="momentum", schedule="constant",
                         hparams={"learning_rate": 0.01, "momentum": 0.9}, max_steps=2,
                         eval_every=1, target=Target("val_error", 0.0), seed=0, device="cpu",
                         data_dir=data_dir, val_size=val_size, loader_workers=0,
                         eval_batch_size=64)
    measurements = []
    result = run_trial(config, on_measurement=measurements.append)
    assert result.outcome in ("not_reached", "diverged") and result.steps == len(measurements) <= 2
    assert [m.step for m in measurements] == list(range(1, result.steps + 1))
    assert all(m.examples == 4 * m.step for m in measurements)
    assert all(math.isfinite(m.val_loss) and 0.0 <= m.val_error <= 1.0 for m in measurements)


def test_per_channel_workloads_vectorize_like_run_trial(tmp_path, monkeypatch):
    """CIFAR and ImageNet workloads normalise per channel: the vectorized trainer
    preprocesses a stack of batches (K, b, C, H, W) at once, and must normalise each
    image as `run_trial` does (it once broadcast the channel constants over b)."""
    import torch

    from trainers.vectorized import is_vectorizable, run_trials_vectorized

    name = "cifar10_resnet8"
    workload = WORKLOADS[name]
    assert isinstance(workload.mean, tuple)
    images = torch.randint(0, 256, (2, 5, 3, 8, 8), dtype=torch.uint8)
    stacked = workload.preprocess(images)
    assert torch.equal(stacked, torch.stack([workload.preprocess(batch) for batch in images]))
    assert stacked[1, 2, 0].mean().item() == pytest.approx(
        (images[1, 2, 0].float() / 255 - workload.mean[0]).mean().item() / workload.std[0], rel=1e-5)

    data_dir, val_size = data_dir_for(name, tmp_path, monkeypatch)
    configs = [TrialConfig(workload=name, batch_size=4, optimizer="momentum", schedule="constant",
                           hparams={"learning_rate": lr, "momentum": 0.9}, max_steps=3, eval_every=1,
                           target=Target("val_error", 0.0), seed=seed, device="cpu", data_dir=data_dir,
                           val_size=val_size, eval_batch_size=64) for lr, seed in ((0.01, 1), (0.05, 2))]
    assert is_vectorizable(configs[0])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch norm amplifies a parallel reduction's order (test_vectorized_bn)
    try:
        expected = []
        for cfg in configs:
            measurements = []
            run_trial(cfg, on_measurement=measurements.append)
            expected.append([loss for m in measurements for loss in (m.train_loss, m.val_loss)])
        got = [[] for _ in configs]
        run_trials_vectorized(configs, on_measurement=lambda i, m: got[i].extend((m.train_loss, m.val_loss)))
    finally:
        torch.set_num_threads(threads)
    assert [len(runs) for runs in got] == [len(runs) for runs in expected] == [6, 6]
    for want, have in zip(expected, got):
        assert have == pytest.approx(want, rel=1e-4)
