"""The compiled step that CUDA graphs replay: write-back copy or compiled in place.

`trainers.cuda_graphs.GraphedStep` keeps a group's state (parameters, buffers, optimizer
state) in static tensors, so each step must leave its new state there. Two ways, timed
here on the same K trials and batches through a `GraphedStep` (captured on CUDA, run
uncaptured on the CPU):

- functional + copy: the compiled functional step, its new state copied into the static
  tensors afterwards (`writing_back(step_fn)`; what batchlab replayed before 2026-11-26);
- compiled in place: the step and its write-back compiled as one (`step_into_fn`, what
  batchlab replays), so inductor stores the update straight into the static tensors.

Data are synthetic, of MNIST's shapes (uint8 28 x 28 images), as in bench.shallue_estimate;
the model is the campaign's (default: Shallue's MNIST simple CNN).

    python -m bench.graphed_step                                   # CPU, K = 8, B = 16
    python -m bench.graphed_step --device cuda --k 32 --batch-size 16

Prints ms per step of each (best of --repeats runs of --steps steps, both warmed up and
compiled first) and the ratio.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from bench.shallue_estimate import DEFAULT_SPEC, synthetic_cache, trial_configs
from bench.versions import versions_line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--campaign", default=str(DEFAULT_SPEC), help="campaign TOML (its workload)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--k", type=int, default=8, help="trials in the stack")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--optimizer", default=None, help="default: the campaign's first")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method (best)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from study.spec import load_spec
    from trainers.cuda_graphs import GraphedStep, writing_back
    from trainers.loop import build_model, resolve_device
    from trainers.vectorized import _make_context, _make_stack, _StepOptions
    from trainers.workloads import DataOptions, get_workload

    spec = load_spec(args.campaign)
    optimizer = args.optimizer or spec.optimizers[0]
    device = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if on_cuda else platform.processor() or platform.machine()
    print(f"device: {device} ({name}, {torch.get_num_threads()} CPU threads)")
    print(versions_line())
    print(f"{spec.workload}, {optimizer}, K = {args.k}, B = {args.batch_size}, compiled, "
          f"{'bf16 autocast, CUDA graphs' if on_cuda else 'fp32, uncaptured'}; best of {args.repeats} "
          f"x {args.steps} steps\n", flush=True)

    workload = get_workload(spec.workload)
    splits = synthetic_cache(max(4 * args.batch_size, 1024), 256).get(workload, DataOptions(), device)
    configs = trial_configs(spec, args.batch_size, optimizer, args.k, args.steps, str(device))
    models = [build_model(workload, c, device) for c in configs]
    options = _StepOptions(True, torch.bfloat16 if on_cuda else None, graphs=True)  # uncaptured on CPU
    context = _make_context(workload, device, splits, models[0], optimizer, options)
    stack = _make_stack(configs, list(range(args.k)), models, device, splits.train_size)
    generator = torch.Generator(device=device).manual_seed(0)
    batches = [torch.randint(0, splits.train_size, (args.k, args.batch_size), generator=generator,
                             device=device) for _ in range(4)]
    inputs = [(stack.tables.row(0), workload.preprocess(splits.train_x[i]), splits.train_y[i])
              for i in batches]
    methods = {"functional + copy": GraphedStep(writing_back(context.step_fn), device),
               "compiled in place": GraphedStep(context.step_into_fn, device)}

    def run(graphed, steps: int) -> float:
        state = graphed.state[:3] if graphed.state else (stack.params, stack.buffers, stack.opt_state)
        if on_cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for step in range(steps):
            *state, _ = graphed(*state, stack.hparams, *inputs[step % len(inputs)], None)
        if on_cuda:
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / steps * 1e3

    for graphed in methods.values():  # compilation, capture
        run(graphed, 3)
    times: dict[str, list[float]] = {method: [] for method in methods}
    for _ in range(args.repeats):  # interleaved, so a drifting machine load hits both alike
        for method, graphed in methods.items():
            times[method].append(run(graphed, args.steps))
    best = {method: min(values) for method, values in times.items()}
    baseline = best["functional + copy"]
    print("| method | ms/step | vs functional + copy |\n|---|---:|---:|")
    for method, ms in best.items():
        print(f"| {method} | {ms:.3f} | {baseline / ms:.2f}x |")


if __name__ == "__main__":
    main()
