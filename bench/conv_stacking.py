"""How to stack K convnet trials: one vmapped (grouped) convolution vs a loop of K plain ones.

`torch.func.vmap` turns a convolution whose input and weight both carry a trial dimension
into one grouped convolution (groups = K, channels K x C). This measures the cost per
trial-step of MNIST's simple CNN (forward + backward, bf16 autocast on CUDA) four ways at
each (batch size, K):

- single: one model, plain autograd (the per-trial floor of any stacking);
- single, channels_last: the same in channels_last memory format (as the trainer runs
  one trial on CUDA);
- single, channels_last, textbook order: the same weights in the order SimpleCNN computed
  before it pooled first (conv with bias -> ReLU -> pool), what a0d2c50 and 0eb186a save;
- vmap: K stacked trials as batchlab's vectorized step computes them, eager
  (`vmap(grad_and_value(functional_call))`);
- loop: K models in a Python loop, losses summed, one backward.

    python -m bench.conv_stacking --device cuda
    python -m bench.conv_stacking --device cuda --profile 4096:9   # + top kernels
    python -m bench.conv_stacking --device cuda --compile-cells 4096:9  # + torch.compile

Prints ms per trial-step per method (best of --repeats timings of --iters steps).
"""
from __future__ import annotations

import argparse
import copy
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from bench.versions import versions_line
from trainers.models.convnets import SimpleCNN


def pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item]


def methods(batch: int, k: int, device: torch.device, dtype):
    """name -> (a step function, trials it trains)."""
    torch.manual_seed(0)
    models = [SimpleCNN().to(device) for _ in range(k)]
    x = torch.randn(k, batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (k, batch), device=device)
    autocast = lambda: torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def single(model, inputs):
        def step():
            with autocast():
                loss = F.cross_entropy(model(inputs), y[0])
            grads = torch.autograd.grad(loss, list(model.parameters()))
            return grads
        return step

    params, buffers = stack_module_state(models)
    skeleton = SimpleCNN().to("meta")

    def loss_fn(p, b, inputs, labels):
        with autocast():
            return F.cross_entropy(functional_call(skeleton, (p, b), (inputs,)), labels)
    stacked = vmap(grad_and_value(loss_fn))

    def loop():
        with autocast():
            loss = sum(F.cross_entropy(m(x[i]), y[i]) for i, m in enumerate(models))
        return torch.autograd.grad(loss, [p for m in models for p in m.parameters()])

    channels_last = SimpleCNN().to(device).to(memory_format=torch.channels_last)
    x_last = x[0].contiguous(memory_format=torch.channels_last)
    return {"single": (single(models[0], x[0]), 1),
            "single, channels_last": (single(channels_last, x_last), 1),
            "single, channels_last, textbook order": (single(textbook_order(channels_last), x_last), 1),
            f"vmap K={k}": (lambda: stacked(params, buffers, x, y), k),
            f"loop K={k}": (loop, k)}


def textbook_order(model: SimpleCNN) -> nn.Module:
    """`model`'s weights in the usual order, conv (bias included) -> ReLU -> pool per block."""
    conv1, _, _, conv2, _, _ = model.features
    convs = [nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, padding=c.padding) for c in (conv1, conv2)]
    for ours, theirs in zip((conv1, conv2), convs):
        theirs.load_state_dict(ours.state_dict())
    return nn.Sequential(convs[0], nn.ReLU(), nn.MaxPool2d(2, 2), convs[1], nn.ReLU(), nn.MaxPool2d(2, 2),
                         *copy.deepcopy(model.classifier)).to(conv1.weight.device,
                                                              memory_format=torch.channels_last)


def timed(step, device: torch.device, iters: int, repeats: int) -> float:
    """Best seconds per step."""
    step()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / iters)
    return best


def profile(step, device: torch.device, rows: int = 12) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cells", type=pairs, default=pairs("16:32,256:30,4096:9,16384:2"),
                        help="BATCH:K,...")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile-cells", type=pairs, default=[],
                        help="BATCH:K cells to time vmap and loop compiled too (torch.compile)")
    parser.add_argument("--profile", type=pairs, default=[], help="BATCH:K cells to profile (vmap)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    print(f"device: {device} ({name})")
    print(f"{versions_line()}; "
          f"{'bf16 autocast, cudnn.benchmark' if dtype else 'fp32'}, eager\n")
    print("| batch | K | method | ms per trial-step | vs vmap |\n|---:|---:|---|---:|---:|")
    for batch, k in args.cells:
        found = methods(batch, k, device, dtype)
        times = {name: timed(step, device, args.iters, args.repeats) * 1000 / trials
                 for name, (step, trials) in found.items()}
        base = times[f"vmap K={k}"]
        for name, ms in times.items():
            print(f"| {batch} | {k} | {name} | {ms:.4f} | {base / ms:.2f}x |", flush=True)
        del found
    for batch, k in args.compile_cells:
        found = methods(batch, k, device, dtype)
        for name in (f"vmap K={k}", f"loop K={k}"):
            step = torch.compile(found[name][0])
            start = time.perf_counter()
            step()
            compile_s = time.perf_counter() - start
            ms = timed(step, device, args.iters, args.repeats) * 1000 / k
            print(f"| {batch} | {k} | {name}, compiled (first call {compile_s:.0f} s) | {ms:.4f} | - |",
                  flush=True)
    for batch, k in args.profile:
        print(f"\nprofile: vmap, batch {batch}, K {k}")
        profile(methods(batch, k, device, dtype)[f"vmap K={k}"][0], device)
        print(f"\nprofile: loop, batch {batch}, K {k}")
        profile(methods(batch, k, device, dtype)[f"loop K={k}"][0], device)


if __name__ == "__main__":
    main()
