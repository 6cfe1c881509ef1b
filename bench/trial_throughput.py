"""Trials per second: a plain PyTorch + DataLoader loop vs batchlab sequential vs vectorized.

Every method trains the same model (built from the same seed as `run_trial` builds it; on
CUDA the typical baseline draws its weights on the CPU and moves the model, as
`Net().to(device)` does, so only its initial values differ) for the same fixed number of
steps with momentum SGD at the same batch size, and evaluates once on the validation set
at the end; the target is `val_error < 0`, which no trial can beat, so nothing stops early
and the steps, data and evaluations are identical. The arithmetic is not on CUDA:
batchlab's methods run its default there (`precision="auto"`: bf16 autocast, and
channels_last for convnets), the baselines fp32, as a plain loop is written; the header
says which. Two baselines, both
`optimizer.zero_grad(); loss.backward(); step()` over a `DataLoader(..., shuffle=True)`:

- "typical": the data pipeline of Optuna's and PyTorch's MNIST examples, a torchvision-style
  dataset that hands out PIL images through `transforms.Compose([ToTensor(), Normalize()])`
  (what `torchvision.datasets.MNIST(transform=...)` does per example);
- "strong": `TensorDataset` over the training set normalised once up front (no
  per-example transform; once per cell, in the untimed warm-up, as a script keeps its
  tensors between trials), the best a hand-written loop does without batchlab's tricks.

Every ratio is printed against both.

    python -m bench.trial_throughput                       # digits_mlp on CPU, ~2-3 min
    python -m bench.trial_throughput --data-dir /work/shared/datasets/mnist-t10k
    python -m bench.trial_throughput --device cuda --ks 8,32,128 --steps 500

Rows "vectorized K" use the default path (trainers.stacked's fast path for these MLPs
when the step is not compiled, i.e. on CPU; on CUDA the compiled step, replayed from CUDA
graphs up to B = 512); "(vmap path)" rows force the torch.func path (`stacked=False`) for
comparison. On CUDA, "(no CUDA graphs)" rows run the compiled step without graphs and
"(eager + CUDA graphs)" rows replay the uncompiled step from graphs, "(eager, no CUDA
graphs)" rows run it as it is (`--no-graph-rows` skips all three). The CUDA rows compile
from the first step (`compile=True`): the steady state. A worker's default, tiered compilation, runs a variant like the "(eager + CUDA graphs)"
row until it has spent 40 s, then like the compiled row.

Prints the device, torch version and date, then trials/second per method and its ratio
against the baseline measured in the same run (best of --repeats).
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision import transforms

from bench.versions import versions_line
from trainers.config import Target, TrialConfig
from trainers.loop import DataCache, build_model, resolve_device, run_trial
from trainers.vectorized import run_trials_vectorized
from trainers.workloads import DataOptions, get_workload

HPARAMS = {"learning_rate": 0.02, "momentum": 0.9}


def trial_configs(workload: str, batch_size: int, steps: int, count: int, device: str,
                  data_dir: str | None) -> list[TrialConfig]:
    """`count` trials of one cell that never stop early (target val_error < 0)."""
    return [TrialConfig(workload=workload, batch_size=batch_size, optimizer="momentum",
                        schedule="constant",
                        hparams={**HPARAMS, "learning_rate": HPARAMS["learning_rate"] * (1 + 0.1 * i)},
                        max_steps=steps, eval_every=steps, target=Target("val_error", 0.0),
                        seed=i, device=device, data_dir=data_dir)
            for i in range(count)]


class ImageDataset(Dataset):
    """What `torchvision.datasets.MNIST` hands a DataLoader: each example as a PIL image
    through the transform, label as an int."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images, labels.tolist(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index].numpy(), mode="L")
        return self.transform(image), self.labels[index]


def image_transform(workload) -> transforms.Compose:
    """ToTensor (x / 255) + Normalize, equal to `workload.preprocess` (x / scale - mean) / std
    up to rounding."""
    ratio = workload.scale / 255.0
    return transforms.Compose([transforms.ToTensor(),
                               transforms.Normalize((workload.mean * ratio,), (workload.std * ratio,))])


def normalised_train_set(workload, splits, prepared: dict | None) -> TensorDataset:
    """The strong baseline's training set: normalised once and kept in `prepared` (a dict
    the caller holds across trials, as a script holds its tensors), not per trial."""
    if prepared is None:
        return TensorDataset(workload.preprocess(splits.train_x), splits.train_y)
    key = ("normalised train set", workload.name)
    cached = prepared.get(key)
    if cached is None or cached[0] is not splits.train_x:
        cached = prepared[key] = (splits.train_x, TensorDataset(workload.preprocess(splits.train_x),
                                                                splits.train_y))
    return cached[1]


def baseline_trial(config: TrialConfig, cache: DataCache, typical: bool = False,
                   prepared: dict | None = None) -> float:
    """A hand-written PyTorch objective ("typical": per-example PIL transforms; otherwise
    a TensorDataset normalised up front, once per `prepared`); returns the final
    validation error."""
    workload = get_workload(config.workload)
    device = resolve_device(config.device)
    splits = cache.get(workload, DataOptions.of(config), torch.device("cpu"))
    if typical:
        train = ImageDataset(splits.train_x.squeeze(1), splits.train_y, image_transform(workload))
    else:
        train = normalised_train_set(workload, splits, prepared)
    loader = DataLoader(train, batch_size=config.batch_size, shuffle=True)
    # The typical objective builds its model on the CPU and moves it (`Net().to(device)`);
    # the strong one draws it on the device, as batchlab does on CUDA.
    model = build_model(workload, config, torch.device("cpu") if typical else device).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.hparams["learning_rate"],
                                momentum=config.hparams["momentum"])
    step = 0
    while step < config.max_steps:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == config.max_steps:
                break
    with torch.no_grad():
        logits = model(workload.preprocess(splits.val_x).to(device))  # both: one batched pass
        return (logits.argmax(1).cpu() != splits.val_y).float().mean().item()


def precision_note(device: torch.device) -> str:
    """Which arithmetic each method runs on `device` (TrialConfig's default precision,
    "auto", is what run_trial and run_trials_vectorized use here)."""
    if device.type == "cuda":
        return ("precision: batchlab sequential and vectorized bf16 autocast (its default, "
                "precision 'auto'); both baselines fp32")
    return "precision: fp32 for every method"


def timed(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best wall seconds of `repeats` runs (synchronised on CUDA)."""
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def warm_up(workload: str, batch_size: int, args, cache: DataCache, step_cache: dict,
            prepared: dict | None = None) -> None:
    """Untimed runs of every method: lazy imports, allocator, data (the strong baseline's
    normalised training set into `prepared`), compilation. A few steps, except for the
    vectorized methods, which run the timed trials once (every stack size and masking
    variant they reach)."""
    few = trial_configs(workload, batch_size, 3, 1, args.device, args.data_dir)
    baseline_trial(few[0], cache, prepared=prepared)
    baseline_trial(few[0], cache, typical=True)
    run_trial(few[0], data_cache=cache)
    timed_configs = trial_configs(workload, batch_size, args.steps, max(args.ks), args.device, args.data_dir)
    for k in args.ks:
        for _, options in vectorized_variants(args):
            run_trials_vectorized(timed_configs[:k], data_cache=cache, chunk_size=k,
                                  step_cache=step_cache, **options)


def vectorized_variants(args) -> list[tuple[str, dict]]:
    """(row suffix, run_trials_vectorized options) of the vectorized rows."""
    default = {"compile": args.compile or resolve_device(args.device).type == "cuda"}
    variants = [("", default)]
    if args.vmap_rows:
        variants.append((" (vmap path)", {**default, "stacked": False}))
    if args.graph_rows and resolve_device(args.device).type == "cuda":
        variants += [(" (no CUDA graphs)", {**default, "cuda_graphs": False}),
                     (" (eager + CUDA graphs)", {"compile": False, "cuda_graphs": True}),
                     (" (eager, no CUDA graphs)", {"compile": False, "cuda_graphs": False})]
    return variants


def bench_cell(workload: str, batch_size: int, args, cache: DataCache,
               step_cache: dict) -> tuple[list[tuple[str, float]], float]:
    """(method, trials per second) for one workload and batch size, and the warm-up's wall
    seconds (on CUDA mostly the compilation of each K's step)."""
    device = resolve_device(args.device)
    sequential_count = args.sequential_trials
    configs = trial_configs(workload, batch_size, args.steps, max([sequential_count, *args.ks]),
                            args.device, args.data_dir)
    few = configs[:sequential_count]
    prepared: dict = {}  # the strong baseline's normalised training set, made in the warm-up
    warm = timed(lambda: warm_up(workload, batch_size, args, cache, step_cache, prepared), device, 1)
    rows = [("baseline, typical (PIL transforms + DataLoader)",
             len(few) / timed(lambda: [baseline_trial(c, cache, typical=True) for c in few],
                              device, args.repeats)),
            ("baseline, strong (normalised TensorDataset + DataLoader)",
             len(few) / timed(lambda: [baseline_trial(c, cache, prepared=prepared) for c in few],
                              device, args.repeats)),
            ("batchlab sequential (run_trial)",
             len(few) / timed(lambda: [run_trial(c, data_cache=cache) for c in few], device, args.repeats))]
    for k in args.ks:
        group = configs[:k]
        for suffix, options in vectorized_variants(args):
            run = lambda: run_trials_vectorized(group, data_cache=cache, chunk_size=k,
                                                step_cache=step_cache, **options)
            rows.append((f"batchlab vectorized K={k}{suffix}", k / timed(run, device, args.repeats)))
    return rows, warm


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda text: [int(v) for v in text.split(",") if v]
    parser.add_argument("--steps", type=int, default=100, help="training steps per trial")
    parser.add_argument("--batch-sizes", type=ints, default=[16, 128, 1024])
    parser.add_argument("--ks", type=ints, default=[8, 32], help="trials per vectorized group")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    parser.add_argument("--sequential-trials", type=int, default=4,
                        help="trials timed for the baseline and sequential rates")
    parser.add_argument("--data-dir", default=None,
                        help="MNIST t10k files: also benchmark mnist10k_mlp")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="compile the vectorized step from its first step (default: on CUDA only)")
    parser.add_argument("--workloads", default=None,
                        help="comma-separated workloads, e.g. digits_mlp,mnist10k_mlp,mnist10k_simple_cnn (default: "
                             "digits_mlp, plus mnist10k_mlp where --data-dir is given); single-channel, "
                             "unaugmented ones only, whose work the baselines reproduce")
    parser.add_argument("--no-vmap-rows", dest="vmap_rows", action="store_false",
                        help="skip the torch.func (vmap) path rows; the default vectorized rows "
                             "use the stacked-MLP fast path where it applies (CPU, not compiled)")
    parser.add_argument("--no-graph-rows", dest="graph_rows", action="store_false",
                        help="on CUDA, skip the rows without CUDA graphs and with the eager step in graphs")
    args = parser.parse_args(argv)
    for name in (args.workloads or "").split(","):
        why = name and unreproduced(name)
        if why:
            parser.error(f"--workloads: {name}: {why}")
    return args


def unreproduced(name: str) -> str | None:
    """Why the baselines cannot do `name`'s work (None where they do): they train on
    resident single-channel images, no augmentation (the typical one hands each to PIL
    as an 'L' image)."""
    from trainers.workloads import WORKLOADS
    workload = WORKLOADS.get(name)
    if workload is None:
        return f"unknown workload; choose one of: {', '.join(sorted(WORKLOADS))}"
    if workload.simulate is not None:
        return "a closed form, not a training loop"
    if workload.load_folders is not None:
        return "streamed through a DataLoader from folders, not resident tensors"
    if workload.augment is not None:
        return "batchlab would augment every batch (crops, flips) and the baselines do not"
    if isinstance(workload.mean, tuple):
        return "several image channels; the typical baseline's PIL pipeline is single-channel"
    return None


def main(argv=None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({name}, {torch.get_num_threads()} CPU threads)")
    print(versions_line())
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"steps per trial: {args.steps}, momentum SGD, one validation pass per trial; "
          f"{precision_note(device)}; load average at start: {load}\n")
    workloads = (args.workloads.split(",") if args.workloads
                 else ["digits_mlp"] + (["mnist10k_mlp"] if args.data_dir else []))
    cache, step_cache = DataCache(), {}
    print("| workload | batch | method | trials/s | vs typical baseline | vs strong baseline |\n"
          "|---|---:|---|---:|---:|---:|")
    warm_ups = []
    for workload in workloads:
        for batch_size in args.batch_sizes:
            rows, warm = bench_cell(workload, batch_size, args, cache, step_cache)
            warm_ups.append(f"{workload} B={batch_size} {warm:.1f} s")
            typical, strong = rows[0][1], rows[1][1]
            for method, rate in rows:
                print(f"| {workload} | {batch_size} | {method} | {rate:.2f} | {rate / typical:.2f}x "
                      f"| {rate / strong:.2f}x |", flush=True)
    print("\nwarm-up per cell (untimed first calls of every method; compilation where the step "
          "is compiled): " + ", ".join(warm_ups))
    print("load average at end: " + ", ".join(f"{v:.1f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
