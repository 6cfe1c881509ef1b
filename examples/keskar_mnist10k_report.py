"""Keskar et al.'s F1 (784 -> 5 x [512, BN, ReLU] -> 10) on MNIST-10k (the 10,000 official
test images: 8,000 train / 2,000 val), Adam lr 1e-3, small batch vs large batch (10% of the
training set = 800), trained (a) to the same training loss and (b) for the same epoch
budget; then Keskar's full-space (C_eps, A)-sharpness and the training-loss Hessian's top
eigenvalue of each final solution, on the 8,000 training images (eval mode: BN running
statistics, so f is deterministic).

This drives the trainers' building blocks directly (no campaign), because the registry has
no `mnist10k_f1` workload; see examples/keskar_mnist10k.toml for the campaign version.

    .venv/bin/python examples/keskar_mnist10k_report.py --seeds 0 --mode loss
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA_DIR = ROOT.parent / "shared" / "datasets" / "mnist-t10k"
MEAN, STD = 0.1307, 0.3081


def load(data_dir=DATA_DIR):
    from trainers.data.mnist import load_mnist_t10k_splits
    s = load_mnist_t10k_splits(data_dir, split_seed=0)
    prep = lambda x: (x.float() / 255.0 - MEAN) / STD  # noqa: E731
    return prep(s.train_x), s.train_y, prep(s.val_x), s.val_y


def loss_fn(logits, labels):
    import torch.nn.functional as F
    per = F.cross_entropy(logits.float(), labels, reduction="none")
    return per.sum(), labels.numel(), per


def evaluate(model, x, y, chunk=2000):
    import torch
    from trainers.probes.hessian import evaluation_mode
    total, correct = 0.0, 0
    with torch.no_grad(), evaluation_mode(model):
        for s in range(0, len(y), chunk):
            out = model(x[s:s + chunk])
            total += float(loss_fn(out, y[s:s + chunk])[0])
            correct += int((out.argmax(1) == y[s:s + chunk]).sum())
    return total / len(y), 1 - correct / len(y)


def train(data, batch_size, *, seed, lr=1e-3, max_epochs=60, target_loss=None, log=print):
    """Adam; evaluates the full training loss after every epoch; stops at `target_loss`
    (training cross-entropy, eval mode) or after `max_epochs`."""
    import torch
    from trainers.models.convnets import KeskarF1
    torch.manual_seed(seed)
    x, y, vx, vy = data
    model = KeskarF1()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n, steps, history = len(y), 0, []
    for epoch in range(1, max_epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n - batch_size + 1, batch_size):  # drop the last partial batch
            idx = perm[s:s + batch_size]
            summed, count, _ = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad()
            (summed / count).backward()
            opt.step()
            steps += 1
        tr_loss, tr_err = evaluate(model, x, y)
        va_loss, va_err = evaluate(model, vx, vy)
        history.append((epoch, steps, tr_loss, tr_err, va_err))
        log(f"B={batch_size} seed={seed} epoch {epoch} steps {steps} train_loss {tr_loss:.3g} "
            f"train_err {tr_err:.4f} val_err {va_err:.4f}")
        if target_loss is not None and tr_loss < target_loss:
            break
    return model, history


def probe(model, data, *, epsilons=(1e-3, 5e-4), maxiter=10, chunk=2000, seed=0):
    from trainers.probes.hessian import HessianOperator, top_eigenvalue
    from trainers.probes.sharpness import model_sharpness
    x, y = data[0], data[1]
    batches = [(x[s:s + chunk], y[s:s + chunk]) for s in range(0, len(y), chunk)]
    out = {}
    for eps in epsilons:
        r = model_sharpness(model, batches, loss_fn, epsilon=eps, space="full", maxiter=maxiter, seed=seed)
        out[f"sharpness_full_{eps:g}"] = r.sharpness
        out["loss"] = r.loss
    eig = top_eigenvalue(HessianOperator(model, batches, loss_fn), max_iter=30, tol=1e-2, seed=seed)
    out["top_eigenvalue"], out["eigen_converged"] = eig.eigenvalue, eig.converged
    return out


def main(argv=None) -> int:
    import torch
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 800])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--mode", choices=["loss", "epochs"], default="loss")
    parser.add_argument("--target-loss", type=float, default=1e-3)
    parser.add_argument("--max-epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default=str(ROOT / "build" / "keskar_mnist10k" / "results.jsonl"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    data = load()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for b in args.batch_sizes:
            t0 = time.time()
            model, hist = train(data, b, seed=seed, lr=args.lr, max_epochs=args.max_epochs,
                                target_loss=args.target_loss if args.mode == "loss" else None)
            t1 = time.time()
            res = probe(model, data)
            row = {"mode": args.mode, "batch_size": b, "seed": seed, "lr": args.lr,
                   "epochs": hist[-1][0], "steps": hist[-1][1], "train_loss": hist[-1][2],
                   "train_err": hist[-1][3], "val_err": hist[-1][4], **res,
                   "train_s": round(t1 - t0, 1), "probe_s": round(time.time() - t1, 1)}
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
