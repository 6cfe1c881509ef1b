"""Creating campaigns: the campaign row, its cells, and one Optuna study per cell."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import optuna
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.models import Campaign, Cell
from db.schema import ensure_schema
from study.spec import CampaignSpec, SpecError
from study.tuning import distributions, enqueue_points, optuna_storage, quasi_random_points, random_points


class CampaignConflict(Exception):
    """A campaign of that name exists with a different spec."""


@dataclass(frozen=True)
class CreateResult:
    campaign_id: int
    created: bool
    cells: int


def study_name(campaign: str, batch_size: int, optimizer: str, schedule: str) -> str:
    return f"{campaign}/bs={batch_size}/opt={optimizer}/sched={schedule}"


def create_campaign(engine: Engine, storage_url: str, spec: CampaignSpec) -> CreateResult:
    """Create the campaign, its cells and their studies, once.

    Running it again with the same spec changes nothing. The Optuna studies are made
    (and their quasi-random points enqueued) before the campaign row is committed, in one
    transaction with its cells: an interrupted create leaves no campaign behind, and
    running it again finishes the studies it had started.

    The dataset is loaded once first (on the CPU): a missing data directory, a corrupt
    or truncated file, a checksum mismatch or a batch size larger than the training set
    ends the command before anything is written."""
    check_data(spec)
    ensure_schema(engine)
    existing = _existing(engine, spec)
    if existing is not None:
        return existing
    storage = optuna_storage(storage_url)
    for batch_size, optimizer, schedule in spec.cells():
        _create_study(storage, spec, study_name(spec.name, batch_size, optimizer, schedule),
                      spec.cell_space(optimizer, schedule))
    try:
        return _insert_campaign(engine, spec)
    except IntegrityError:  # a create of the same name, running beside this one, committed first
        existing = _existing(engine, spec)
        if existing is None:
            raise
        return existing


def _existing(engine: Engine, spec: CampaignSpec) -> CreateResult | None:
    """The campaign named as `spec` (created False), None if there is none; raises
    CampaignConflict if it has another spec."""
    with Session(engine) as session:
        existing = session.scalar(select(Campaign).where(Campaign.name == spec.name))
        if existing is None:
            return None
        if existing.spec != spec.to_json():
            raise CampaignConflict(
                f"campaign {spec.name!r} already exists with a different spec; "
                f"give the new campaign another name")
        return CreateResult(existing.id, False, len(existing.cells))


def _insert_campaign(engine: Engine, spec: CampaignSpec) -> CreateResult:
    with Session(engine) as session, session.begin():
        campaign = Campaign(
            name=spec.name, workload=spec.workload, target_metric=spec.target.metric,
            target_threshold=spec.target.threshold, target_mode=spec.target.mode,
            eval_every=spec.eval_every, max_steps=spec.max_steps,
            trials_per_cell=spec.trials_per_cell, sampler=spec.sampler,
            spec=spec.to_json(), spec_text=spec.text)
        campaign.cells = [
            Cell(batch_size=b, optimizer=o, schedule=s, study_name=study_name(spec.name, b, o, s),
                 trials_planned=spec.trials_per_cell, trials_claimed=0)
            for b, o, s in spec.cells()]
        session.add(campaign)
        session.flush()
        return CreateResult(campaign.id, True, len(campaign.cells))


def check_data(spec: CampaignSpec) -> int:
    """Load the campaign's dataset and check every batch size fits its training set;
    returns the training-set size. Raises DataError or SpecError (user errors)."""
    import torch  # only when creating

    from trainers.loop import DataCache
    from trainers.workloads import DataOptions, get_workload
    workload = get_workload(spec.workload)
    data = DataCache().load(workload, DataOptions.of(spec), torch.device("cpu"))
    train_size = data.train_size
    too_large = [b for b in spec.batch_sizes if b > train_size]
    if too_large:
        raise SpecError(spec.source, "campaign.batch_sizes",
                        f"batch size {', '.join(map(str, too_large))} is larger than the training set of "
                        f"{spec.workload!r} ({train_size} examples)")
    if workload.simulate is None:
        _check_batch_norm(spec, workload, data)
    return train_size


def _check_batch_norm(spec: CampaignSpec, workload, data) -> None:
    """Refuse a cell whose trials the trainer would refuse: a batch-norm layer normalizing
    a single example (`trainers.loop.check_batch_statistics`). Every trial fails with a
    fixed ghost_batch_size of 1, batch size 1, or an epoch's last batch of one example;
    a searched ghost_batch_size that can be 1 (the trainer reads int(value)) fails the
    trials that draw it, each a lost slot: its range must start at 2."""
    from trainers.config import TrialConfig
    from trainers.loop import check_batch_statistics, example_shape
    for batch_size, optimizer, schedule in spec.cells():
        definition = spec.schedule_def(schedule)
        ghost = next((p for p in spec.cell_space(optimizer, schedule) if p.name == "ghost_batch_size"), None)
        config = TrialConfig(spec.workload, batch_size, optimizer, definition.lr_schedule,
                             hparams={"ghost_batch_size": ghost.value} if ghost is not None and ghost.is_fixed
                             else {}, batch_plan=definition.batch_plan)
        where = f"cell (batch size {batch_size}, {optimizer}, {schedule})"
        try:
            check_batch_statistics(workload, config, data.train_size, lambda: example_shape(data))
        except ValueError as exc:
            raise SpecError(spec.source, where, f"every trial would fail: {exc}") from None
        if ghost is None or ghost.is_fixed or not _can_be_one(ghost):
            continue
        try:
            check_batch_statistics(workload, dataclasses.replace(config, hparams={"ghost_batch_size": 1}),
                                   data.train_size, lambda: example_shape(data))
        except ValueError as exc:
            raise SpecError(spec.source, where,
                            f"ghost_batch_size can be drawn as 1 (a range starting below 2, or 1 "
                            f"among its choices), and every trial that draws it would fail: {exc}") from None


def _can_be_one(param) -> bool:
    """Whether a searched value can reach the trainer as 1 (it reads int(value))."""
    if param.choices is not None:
        return any(isinstance(c, (int, float)) and not isinstance(c, bool) and int(c) == 1
                   for c in param.choices)
    return param.low is not None and param.low < 2


def _create_study(storage, spec: CampaignSpec, name: str, space) -> None:
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize",
                                load_if_exists=True)
    if spec.sampler == "tpe":
        return  # TPE proposes live, from the trials finished so far
    make_points = quasi_random_points if spec.sampler == "quasi_random" else random_points
    # Each point once, also after an interrupted create or beside a concurrent one.
    enqueue_points(storage, study.study_name, make_points(distributions(space), spec.trials_per_cell, spec.seed))
