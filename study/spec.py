"""Campaign specs: TOML files validated into frozen, typed configuration.

Every mistake a user can make ends in one `SpecError` that names the file, the field
and what is wrong; nothing is written anywhere before a spec is valid.
"""
from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from trainers.config import METRICS, Target
from trainers.optim import OPTIMIZERS
from trainers.schedules import SCHEDULES
from trainers.workloads import WORKLOADS

SCALES = ("log", "linear", "reverse_log")
CHECKPOINT_MODES = ("none", "winners", "all")
SAMPLERS = ("quasi_random", "tpe", "random")
# Hyperparameters the training loop itself reads, valid in any cell.
LOOP_HPARAMS = ("ghost_batch_size", "grad_clip_norm")


class SpecError(Exception):
    def __init__(self, source: str, field_name: str, message: str):
        self.source, self.field_name = source, field_name
        super().__init__(f"{source}: {field_name}: {message}")


@dataclass(frozen=True)
class Param:
    """A searched range (`low`/`high` with a scale), a list of `choices`, or a fixed value.

    `reverse_log` samples 1 - value in log space (momentum: 0.9 .. 0.999 spread evenly
    over 1 - m = 0.1 .. 0.001)."""

    name: str
    low: float | None = None
    high: float | None = None
    scale: Literal["log", "linear", "reverse_log"] | None = None
    integer: bool = False
    choices: tuple | None = None
    value: float | int | str | None = None

    @property
    def is_fixed(self) -> bool:
        return self.value is not None


@dataclass(frozen=True)
class ScheduleDef:
    """A cell's schedule axis value: a learning-rate schedule from the registry and,
    optionally, a batch-size plan (Smith et al.'s modes) that grows B at epoch milestones."""

    name: str
    lr_schedule: str
    batch_plan: Mapping | None = None


@dataclass(frozen=True)
class Scaling:
    """Learning rates given for `base_batch_size`: the trial's rate is the sampled one
    scaled by the `rule` (linear: x B/B0; sqrt: x sqrt(B/B0)). `regime_adaptation`
    (Hoffer et al.) stretches every epoch count and milestone by ceil(B / B0)."""

    rule: Literal["linear", "sqrt", "none"]
    base_batch_size: int
    regime_adaptation: bool = False


@dataclass(frozen=True)
class CampaignSpec:
    name: str
    workload: str
    target: Target
    batch_sizes: tuple[int, ...]
    optimizers: tuple[str, ...]
    schedules: tuple[str, ...]
    spaces: Mapping[str, tuple[Param, ...]]  # "optimizer:NAME" / "schedule:NAME" / "all"
    trials_per_cell: int
    max_steps: int
    eval_every: int
    sampler: str = "quasi_random"
    seed: int = 0
    prune: bool = True
    data_dir: str | None = None
    download: bool = False
    divergence_factor: float = 10.0
    max_epochs: int | None = None
    val_size: int | None = None
    # DataLoader worker processes of folder workloads (ImageNet at full size). Each seeds
    # the augmentation of the batches it loads, so the count is part of what a seed means.
    loader_workers: int = 8
    schedule_defs: Mapping[str, ScheduleDef] = field(default_factory=dict)
    scaling: Scaling | None = None
    # Probes during training (trainers.probe_hooks.PROBES) and final-weight checkpoints.
    probes: tuple[str, ...] = ()
    noise_scale_batches: int = 10
    checkpoints: Literal["none", "winners", "all"] = "none"
    checkpoint_dir: str = "checkpoints"
    checkpoint_max_mb: float = 1000.0
    source: str = "<spec>"
    text: str = field(default="", compare=False)

    def cell_space(self, optimizer: str, schedule: str) -> tuple[Param, ...]:
        return (self.spaces.get("all", ()) + self.spaces.get(f"optimizer:{optimizer}", ())
                + self.spaces.get(f"schedule:{schedule}", ()))

    def cells(self) -> list[tuple[int, str, str]]:
        return [(b, o, s) for o in self.optimizers for s in self.schedules for b in self.batch_sizes]

    def schedule_def(self, name: str) -> ScheduleDef:
        return self.schedule_defs.get(name) or ScheduleDef(name, name)

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("text")
        out.pop("source")  # the same spec may be read from another path
        out["spaces"] = {k: [asdict(p) for p in v] for k, v in self.spaces.items()}
        # Probe and checkpoint options left at their defaults are not written, so a
        # campaign created before they existed still compares equal to its spec.
        for name, default in _PROBE_DEFAULTS.items():
            if out.get(name) == default:
                out.pop(name)
        return json.loads(json.dumps(out))


_PROBE_DEFAULTS = {"probes": (), "noise_scale_batches": 10, "checkpoints": "none",
                   "checkpoint_dir": "checkpoints", "checkpoint_max_mb": 1000.0}


def load_spec(path: str | Path) -> CampaignSpec:
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(source, "<file>", f"cannot be read ({exc.strerror})") from None
    return parse_spec(text, source)


def parse_spec(text: str, source: str = "<spec>") -> CampaignSpec:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(source, "<toml>", f"not valid TOML ({exc})") from None
    return _Validator(raw, source).spec(text)


class _Validator:
    """Walks the raw TOML; each accessor names the field it checks in its error."""

    def __init__(self, raw: dict, source: str):
        self.raw, self.source = raw, source

    def fail(self, field_name: str, message: str):
        raise SpecError(self.source, field_name, message)

    def table(self, name: str, required: bool = True) -> dict:
        value = self.raw.get(name)
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            self.fail(name, "missing table" if value is None else "must be a table")
        return value

    def get(self, table: dict, prefix: str, key: str, kind, default=..., check=None):
        field_name = f"{prefix}.{key}"
        if key not in table:
            if default is ...:
                self.fail(field_name, "is required")
            return default
        value = table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(field_name, f"must be {_kind_name(kind)}, got {value!r}")
        if check is not None:
            problem = check(value)
            if problem:
                self.fail(field_name, problem)
        return value

    def names(self, table: dict, key: str, registry: Mapping) -> tuple[str, ...]:
        values = self.get(table, "campaign", key, list)
        if not values:
            self.fail(f"campaign.{key}", "must not be empty")
        for value in values:
            if value not in registry:
                self.fail(f"campaign.{key}", f"unknown {key[:-1]} {value!r}; "
                          f"choose from {', '.join(sorted(registry))}")
        if len(set(values)) != len(values):
            self.fail(f"campaign.{key}", "has duplicates")
        return tuple(values)

    def spec(self, text: str) -> CampaignSpec:
        known = {"campaign", "target", "sampler", "search_space", "schedule", "scaling"}
        for key in self.raw:
            if key not in known:
                self.fail(key, f"unknown table; expected one of {', '.join(sorted(known))}")
        campaign = self.table("campaign")
        self.unknown_keys(campaign, "campaign", {
            "name", "workload", "batch_sizes", "optimizers", "schedules", "trials_per_cell",
            "max_steps", "eval_every", "seed", "prune", "data_dir", "download",
            "divergence_factor", "max_epochs", "val_size", "loader_workers", *_PROBE_DEFAULTS})
        name = self.get(campaign, "campaign", "name", str, check=_check_name)
        workload = self.get(campaign, "campaign", "workload", str,
                            check=lambda w: None if w in WORKLOADS else
                            f"unknown workload {w!r}; choose from {', '.join(sorted(WORKLOADS))}")
        batch_sizes = self.batch_sizes(campaign)
        optimizers = self.names(campaign, "optimizers", optimizer_hparams(WORKLOADS[workload]))
        schedule_defs = self.schedule_defs()
        schedules = self.names(campaign, "schedules", {**SCHEDULES, **schedule_defs})
        for schedule in schedules:  # a plan starts at every cell's batch size
            plan = schedule_defs[schedule].batch_plan if schedule in schedule_defs else None
            for batch_size in batch_sizes if plan is not None else ():
                self.check_batch_plan(dict(plan), f"schedule.{schedule}.batch", batch_size)
        positive = lambda v: None if v > 0 else "must be > 0"
        max_steps = self.get(campaign, "campaign", "max_steps", int, check=positive)
        eval_every = self.get(campaign, "campaign", "eval_every", int, check=lambda v: (
            "must be > 0" if v <= 0 else f"must be <= max_steps ({max_steps})" if v > max_steps else None))
        spaces = self.search_spaces(optimizers, schedules, schedule_defs,
                                    optimizer_hparams(WORKLOADS[workload]))
        data_dir = self.get(campaign, "campaign", "data_dir", str, None)
        if WORKLOADS[workload].needs_data_dir and not data_dir:
            self.fail("campaign.data_dir", f"workload {workload!r} reads files from disk: set data_dir")
        sampler_table = self.table("sampler", required=False)
        self.unknown_keys(sampler_table, "sampler", {"kind"})  # seeded by campaign.seed
        spec = CampaignSpec(
            name=name, workload=workload, target=self.target(), batch_sizes=batch_sizes,
            optimizers=optimizers, schedules=schedules, spaces=spaces,
            trials_per_cell=self.get(campaign, "campaign", "trials_per_cell", int, check=positive),
            max_steps=max_steps, eval_every=eval_every,
            sampler=self.get(sampler_table, "sampler", "kind", str, "quasi_random", check=lambda s: (
                None if s in SAMPLERS else f"unknown sampler {s!r}; choose from {', '.join(SAMPLERS)}")),
            seed=self.get(campaign, "campaign", "seed", int, 0),
            prune=self.get(campaign, "campaign", "prune", bool, True),
            data_dir=data_dir, download=self.get(campaign, "campaign", "download", bool, False),
            divergence_factor=self.get(campaign, "campaign", "divergence_factor", float, 10.0,
                                       check=lambda v: None if v > 1 else "must be > 1"),
            max_epochs=self.get(campaign, "campaign", "max_epochs", int, None, check=positive),
            val_size=self.get(campaign, "campaign", "val_size", int, None, check=positive),
            loader_workers=self.get(campaign, "campaign", "loader_workers", int, 8,
                                    check=lambda v: None if v >= 0 else "must be >= 0"),
            schedule_defs={n: d for n, d in schedule_defs.items() if n in schedules},
            scaling=self.scaling(), source=self.source, text=text, **self.probe_options(campaign))
        self.check_cells_complete(spec)
        return spec

    def probe_options(self, campaign: dict) -> dict:
        """campaign.probes, noise_scale_batches, checkpoints, checkpoint_dir, checkpoint_max_mb."""
        from trainers.probe_hooks import PROBES
        probes = self.get(campaign, "campaign", "probes", list, [])
        for probe in probes:
            if probe not in PROBES:
                self.fail("campaign.probes", f"unknown probe {probe!r}; choose from {', '.join(PROBES)}")
        if len(set(probes)) != len(probes):
            self.fail("campaign.probes", "has duplicates")
        return dict(
            probes=tuple(probes),
            noise_scale_batches=self.get(campaign, "campaign", "noise_scale_batches", int, 10,
                                         check=lambda n: None if n >= 2 else "must be >= 2"),
            checkpoints=self.get(campaign, "campaign", "checkpoints", str, "none", check=lambda m: (
                None if m in CHECKPOINT_MODES else f"must be one of {', '.join(CHECKPOINT_MODES)}")),
            checkpoint_dir=self.get(campaign, "campaign", "checkpoint_dir", str, "checkpoints",
                                    check=lambda d: None if d.strip() else "must not be empty"),
            checkpoint_max_mb=self.get(campaign, "campaign", "checkpoint_max_mb", float, 1000.0,
                                       check=lambda v: None if v > 0 else "must be > 0"))

    def schedule_defs(self) -> dict[str, ScheduleDef]:
        """`[schedule.NAME]` tables: lr_schedule (a registry name) and an optional batch plan."""
        defs = {}
        for name, table in self.table("schedule", required=False).items():
            prefix = f"schedule.{name}"
            if not isinstance(table, dict):
                self.fail(prefix, "must be a table")
            self.unknown_keys(table, prefix, {"lr_schedule", "batch"})
            lr_schedule = self.get(table, prefix, "lr_schedule", str, name, check=lambda v: (
                None if v in SCHEDULES else f"unknown schedule {v!r}; choose from {', '.join(sorted(SCHEDULES))}"))
            batch = self.get(table, prefix, "batch", dict, None)
            if batch is not None:
                self.check_batch_plan(batch, f"{prefix}.batch")
            defs[name] = ScheduleDef(name, lr_schedule, batch)
        return defs

    def check_batch_plan(self, batch: dict, prefix: str, batch_size: int = 1) -> None:
        from trainers.batch_schedules import BatchSizePlan
        self.unknown_keys(batch, prefix, {"mode", "factor", "milestones", "max_batch_size",
                                          "hybrid_increases"})
        try:
            BatchSizePlan(batch_size, **batch)
        except (TypeError, ValueError) as exc:
            self.fail(prefix, str(exc) if batch_size == 1 else f"at batch size {batch_size}: {exc}")

    def scaling(self) -> Scaling | None:
        table = self.table("scaling", required=False)
        if not table:
            return None
        self.unknown_keys(table, "scaling", {"rule", "base_batch_size", "regime_adaptation"})
        return Scaling(
            rule=self.get(table, "scaling", "rule", str, "none", check=lambda r: (
                None if r in ("linear", "sqrt", "none") else "must be linear, sqrt or none")),
            base_batch_size=self.get(table, "scaling", "base_batch_size", int,
                                     check=lambda v: None if v > 0 else "must be > 0"),
            regime_adaptation=self.get(table, "scaling", "regime_adaptation", bool, False))

    def unknown_keys(self, table: dict, prefix: str, allowed: set[str]) -> None:
        for key in table:
            if key not in allowed:
                self.fail(f"{prefix}.{key}", f"unknown field; expected one of {', '.join(sorted(allowed))}")

    def batch_sizes(self, campaign: dict) -> tuple[int, ...]:
        values = self.get(campaign, "campaign", "batch_sizes", list)
        if not values:
            self.fail("campaign.batch_sizes", "must not be empty")
        for value in values:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                self.fail("campaign.batch_sizes", f"must be positive integers, got {value!r}")
        if len(set(values)) != len(values):
            self.fail("campaign.batch_sizes", "has duplicates")
        return tuple(sorted(values))

    def target(self) -> Target:
        table = self.table("target")
        self.unknown_keys(table, "target", {"metric", "threshold"})
        metric = self.get(table, "target", "metric", str, check=lambda m: None if m in METRICS else
                          f"unknown metric {m!r}; choose from {', '.join(METRICS)}")
        threshold = self.get(table, "target", "threshold", float,
                             check=lambda t: None if math.isfinite(t) else "must be finite")
        return Target(metric, threshold)

    def search_spaces(self, optimizers, schedules, schedule_defs,
                      optimizer_table) -> dict[str, tuple[Param, ...]]:
        table = self.table("search_space")
        self.unknown_keys(table, "search_space", {"all", "optimizer", "schedule"})
        spaces: dict[str, tuple[Param, ...]] = {}
        if "all" in table:
            spaces["all"] = self.params(table["all"], "search_space.all")
        for group, chosen, registry in (("optimizer", optimizers, optimizer_table),
                                        ("schedule", schedules, {**SCHEDULES, **schedule_defs})):
            entries = table.get(group, {})
            if not isinstance(entries, dict):
                self.fail(f"search_space.{group}", "must be a table")
            for name, params in entries.items():
                prefix = f"search_space.{group}.{name}"
                if name not in registry:
                    self.fail(prefix, f"unknown {group} {name!r}")
                if name not in chosen:
                    self.fail(prefix, f"{group} {name!r} is not in campaign.{group}s")
                spaces[f"{group}:{name}"] = self.params(params, prefix)
        return spaces

    def params(self, table, prefix: str) -> tuple[Param, ...]:
        if not isinstance(table, dict):
            self.fail(prefix, "must be a table of hyperparameters")
        return tuple(self.param(name, value, f"{prefix}.{name}") for name, value in table.items())

    def param(self, name: str, value: Any, field_name: str) -> Param:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return Param(name, value=value)
        if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            return Param(name, value=",".join(f"{v:g}" for v in value))  # e.g. milestones
        if not isinstance(value, dict):
            self.fail(field_name, "must be a number (fixed), {low, high, scale} or {choices}")
        if "choices" in value:
            choices = value["choices"]
            if set(value) != {"choices"} or not isinstance(choices, list) or not choices:
                self.fail(field_name, "choices must be a non-empty list and stand alone")
            return Param(name, choices=tuple(choices))
        self.unknown_keys(value, field_name, {"low", "high", "scale", "integer"})
        low = self.get(value, field_name, "low", float)
        high = self.get(value, field_name, "high", float)
        scale = self.get(value, field_name, "scale", str, "linear", check=lambda s: (
            None if s in SCALES else f"must be one of {', '.join(SCALES)}"))
        integer = self.get(value, field_name, "integer", bool, False)
        if not low < high:
            self.fail(f"{field_name}.low", f"must be < high ({low:g} >= {high:g})")
        if scale == "log" and low <= 0:
            self.fail(f"{field_name}.low", "must be > 0 on a log scale")
        if scale == "reverse_log" and not (high < 1):
            self.fail(f"{field_name}.high", "must be < 1 on a reverse_log scale (1 - value is logged)")
        if integer and scale == "reverse_log":
            self.fail(f"{field_name}.integer", "integers cannot use a reverse_log scale")
        return Param(name, low=low, high=high, scale=scale, integer=integer)

    def check_cells_complete(self, spec: CampaignSpec) -> None:
        """Every cell's space covers what its optimizer and schedule need, once."""
        for optimizer in spec.optimizers:
            for schedule in spec.schedules:
                space = spec.cell_space(optimizer, schedule)
                names = [p.name for p in space]
                for duplicate in {n for n in names if names.count(n) > 1}:
                    self.fail("search_space", f"{duplicate!r} is set twice for cell "
                              f"({optimizer}, {schedule})")
                opt_required, opt_optional = optimizer_hparams(WORKLOADS[spec.workload])[optimizer]
                sched = SCHEDULES[spec.schedule_def(schedule).lr_schedule]
                allowed = set(opt_required) | set(opt_optional) | set(sched.required) | \
                    set(sched.optional) | set(LOOP_HPARAMS)
                for param_name in names:
                    if param_name not in allowed:
                        self.fail("search_space", f"{param_name!r} is not a hyperparameter of "
                                  f"optimizer {optimizer!r} or schedule {schedule!r}")
                for required in (*opt_required, *sched.required):
                    if required not in names:
                        group = "optimizer" if required in opt_required else "schedule"
                        owner = optimizer if group == "optimizer" else schedule
                        self.fail(f"search_space.{group}.{owner}.{required}",
                                  "is required (give a range, choices or a fixed value)")


def optimizer_hparams(workload) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Optimizer name -> (required, optional) hyperparameters: torch's registry, or the
    update rules a closed-form workload (the NQM) models."""
    if workload.optimizers is not None:
        return {name: (tuple(names), ()) for name, names in workload.optimizers.items()}
    return {name: (spec.required, tuple(spec.optional)) for name, spec in OPTIMIZERS.items()}


def _check_name(name: str) -> str | None:
    if not name or len(name) > 100:
        return "must be 1 to 100 characters"
    if not all(c.isalnum() or c in "-_." for c in name):
        return "may contain only letters, digits, '-', '_' and '.'"
    return None


def _kind_name(kind) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            list: "a list", dict: "a table"}[kind]
