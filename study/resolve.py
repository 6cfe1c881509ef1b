"""From a cell and a trial's sampled hyperparameters to the frozen `TrialConfig` the
trainer runs: the one place where campaign-level rules (learning-rate scaling with the
batch size, regime adaptation) are applied, so the stored config is exactly what ran."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

from study.spec import CampaignSpec
from trainers.config import TrialConfig
from trainers.scaling import linear_scaled_lr, regime_adaptation_factor, sqrt_scaled_lr
from trainers.optim import get_optimizer
from trainers.schedules import get_schedule, parse_milestones
from trainers.workloads import get_workload

EPOCH_HPARAMS = ("warmup_epochs",)


def resolve_trial_config(spec: CampaignSpec, *, batch_size: int, optimizer: str, schedule: str,
                         hparams: Mapping[str, object], seed: int, device: str) -> TrialConfig:
    definition = spec.schedule_def(schedule)
    # The optimizer's and the schedule's defaults for what the trial leaves out, so that
    # the stored config says every value it trains with (lars' momentum 0.9, a warm-up's
    # 5 epochs: analysis reads them, regime adaptation stretches them).
    # (A closed-form workload, the NQM, models its own update rules, without defaults.)
    closed_form = get_workload(spec.workload).optimizers is not None
    hparams = {**({} if closed_form else get_optimizer(optimizer).optional),
               **get_schedule(definition.lr_schedule).optional, **hparams}
    batch_plan = dict(definition.batch_plan) if definition.batch_plan else None
    max_epochs = spec.max_epochs
    if spec.scaling is not None:
        hparams = _scale_learning_rate(hparams, spec.scaling.rule, batch_size,
                                       spec.scaling.base_batch_size)
        if spec.scaling.regime_adaptation:
            factor = regime_adaptation_factor(batch_size, spec.scaling.base_batch_size)
            hparams, batch_plan, max_epochs = _stretch_epochs(hparams, batch_plan, max_epochs, factor)
    return TrialConfig(
        workload=spec.workload, batch_size=batch_size, optimizer=optimizer,
        schedule=definition.lr_schedule, hparams=hparams, max_steps=spec.max_steps,
        max_epochs=max_epochs, batch_plan=batch_plan, eval_every=spec.eval_every,
        target=spec.target, seed=seed, device=device, data_dir=spec.data_dir,
        download=spec.download, val_size=spec.val_size, loader_workers=spec.loader_workers,
        divergence_factor=spec.divergence_factor,
        probes=spec.probes, noise_scale_batches=spec.noise_scale_batches)


def checkpoint_file(spec: CampaignSpec, trial_row_id: int) -> Path:
    """Where a trial's final weights go: CHECKPOINT_DIR/CAMPAIGN/trial_ROWID.pt (the
    bl_trials row id is unique across workers and machines; the folder must be shared
    by every worker's machine for the probe commands to find the files)."""
    return Path(spec.checkpoint_dir) / spec.name / f"trial_{trial_row_id}.pt"


def with_checkpoint(spec: CampaignSpec, config: TrialConfig, trial_row_id: int) -> TrialConfig:
    """`config` with the campaign's checkpoint settings: "winners" saves every reached
    trial (a worker cannot know the cell's final winner in advance; the probe commands
    pick each cell's winner later), "all" every finished trial, "none" nothing."""
    if spec.checkpoints == "none":
        return config
    return dataclasses.replace(
        config, checkpoint_path=str(checkpoint_file(spec, trial_row_id)),
        checkpoint_reached_only=spec.checkpoints == "winners",
        checkpoint_max_bytes=int(spec.checkpoint_max_mb * 1e6))


def _scale_learning_rate(hparams: dict, rule: str, batch_size: int, base: int) -> dict:
    """The sampled rate is the base batch size's; keep it as `base_learning_rate`."""
    if rule == "none":
        return hparams
    scale = linear_scaled_lr if rule == "linear" else sqrt_scaled_lr
    base_lr = float(hparams["learning_rate"])
    return {**hparams, "base_learning_rate": base_lr,
            "learning_rate": scale(base_lr, batch_size, base)}


def _stretch_epochs(hparams: dict, batch_plan: dict | None, max_epochs: int | None, factor: int):
    """Hoffer et al.'s regime adaptation: every epoch count and milestone x factor."""
    hparams = dict(hparams)
    if "milestones" in hparams:
        hparams["milestones"] = ",".join(f"{m * factor:g}" for m in parse_milestones(hparams["milestones"]))
    for name in EPOCH_HPARAMS:
        if name in hparams:
            hparams[name] = float(hparams[name]) * factor
    if batch_plan and "milestones" in batch_plan:
        batch_plan = {**batch_plan, "milestones": [int(m) * factor for m in parse_milestones(batch_plan["milestones"])]}
    return hparams, batch_plan, (max_epochs * factor if max_epochs is not None else None)
