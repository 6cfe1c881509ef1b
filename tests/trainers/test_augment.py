"""On-device augmentation: determinism, invariants, and crops against explicit slicing."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainers.augment import crop_and_flip, crop_windows, flip_where, random_crop, random_flip


def _batch(shape=(6, 3, 8, 8)) -> torch.Tensor:
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_same_seed_same_result_other_seed_other_result():
    x = _batch()
    first = crop_and_flip(x, _gen(3), padding=2)
    torch.testing.assert_close(first, crop_and_flip(x, _gen(3), padding=2), rtol=0, atol=0)
    assert not torch.equal(first, crop_and_flip(x, _gen(4), padding=2))


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_shapes_and_dtype_preserved(mode):
    x = _batch((5, 3, 10, 7))
    out = crop_and_flip(x, _gen(0), padding=3, mode=mode)
    assert out.shape == x.shape and out.dtype == x.dtype


def test_padding_zero_is_identity():
    x = _batch()
    torch.testing.assert_close(random_crop(x, _gen(0), padding=0), x, rtol=0, atol=0)


def test_flip_is_its_own_inverse():
    x = _batch()
    once = random_flip(x, _gen(7))
    torch.testing.assert_close(random_flip(once, _gen(7)), x, rtol=0, atol=0)
    mask = torch.tensor([True, False, True, False, True, True])
    torch.testing.assert_close(flip_where(flip_where(x, mask), mask), x, rtol=0, atol=0)


def test_flip_mirrors_exactly_the_masked_images():
    x = _batch()
    mask = torch.tensor([True, False, False, True, False, True])
    out = flip_where(x, mask)
    for b in range(len(x)):
        expected = x[b, :, :, torch.arange(7, -1, -1)] if mask[b] else x[b]
        torch.testing.assert_close(out[b], expected, rtol=0, atol=0)


def test_random_flip_flips_about_half():
    x = _batch((2000, 1, 1, 2))
    flipped = (random_flip(x, _gen(0))[:, 0, 0, 0] != x[:, 0, 0, 0]).float().mean()
    assert 0.45 < flipped < 0.55


def test_crop_windows_match_explicit_slicing():
    padded = _batch((4, 2, 9, 11))
    top, left = torch.tensor([0, 3, 1, 2]), torch.tensor([4, 0, 2, 1])
    out = crop_windows(padded, top, left, 6, 7)
    for b in range(4):
        t, l = int(top[b]), int(left[b])
        torch.testing.assert_close(out[b], padded[b, :, t:t + 6, l:l + 7], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_random_crop_is_a_shifted_window_of_the_padded_image(mode):
    x, padding = _batch(), 2
    out = random_crop(x, _gen(11), padding=padding, mode=mode)
    # Replay the generator: the offsets are the first two (B,) integer draws.
    replay = _gen(11)
    top = torch.randint(0, 2 * padding + 1, (len(x),), generator=replay)
    left = torch.randint(0, 2 * padding + 1, (len(x),), generator=replay)
    padded = F.pad(x, (padding,) * 4, mode=mode)
    for b in range(len(x)):
        t, l = int(top[b]), int(left[b])
        torch.testing.assert_close(out[b], padded[b, :, t:t + 8, l:l + 8], rtol=0, atol=0)
    assert len(set(zip(top.tolist(), left.tolist()))) > 1  # the images really moved differently


def test_zero_padding_brings_in_zeros_and_reflect_does_not():
    x = torch.ones(64, 1, 4, 4)
    assert (random_crop(x, _gen(0), padding=2, mode="constant") == 0).any()
    assert (random_crop(x, _gen(0), padding=2, mode="reflect") == 1).all()


class _RandomImages(torch.utils.data.Dataset):
    """uint8 images augmented in the dataset, as a DataLoader workload's transforms are:
    noise from torch's global RNG and a shift from Python's `random`."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int):
        import random
        noise = torch.randint(0, 100, (3, 4, 4), dtype=torch.uint8)
        return noise + random.randrange(0, 100) + index, index % 10


def _loaded(workers: int, seed: int) -> list[torch.Tensor]:
    from trainers.batches import LoaderBatches
    from trainers.workloads import get_workload
    batches = LoaderBatches(_RandomImages(), _RandomImages(), get_workload("imagenet_resnet50"),
                            torch.device("cpu"), num_workers=workers)
    return [x for x, _, _ in batches.epoch(8, _gen(seed))] + [x for x, _ in batches.eval_batches(12)]


def _global_states():
    import random
    return torch.get_rng_state(), random.getstate()


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_augmentation_follows_the_trials_generator(workers):
    """The loader seeds the transforms from the trial's generator: in worker processes,
    or, with 0 workers, on RNG states of its own in this process. Same trial seed, same
    batches, whatever the process drew before; the caller's global RNGs are untouched."""
    import random
    torch.manual_seed(1)
    random.seed(1)
    before = _global_states()
    first = _loaded(workers, seed=123)
    after = _global_states()
    assert torch.equal(before[0], after[0]) and before[1] == after[1]
    torch.rand(5)
    random.random()
    again = _loaded(workers, seed=123)
    other = _loaded(workers, seed=124)
    assert len(first) == 3 + 2 and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first[:3], other[:3]))  # training batches
