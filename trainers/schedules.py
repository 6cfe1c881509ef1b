"""Learning-rate schedule registry: name -> factory(hparams, max_steps) -> f(step, epoch).

The returned factor multiplies the base `learning_rate`. `step` counts updates from 0;
`epoch` is the fractional number of epochs completed (examples seen / training-set size),
for schedules whose milestones are in epochs. Every schedule parameter is read from the
trial's hparams, so a campaign can fix it or search over it like any hyperparameter.

| name         | required    | optional (default)                         | factor                  |
|--------------|-------------|--------------------------------------------|-------------------------|
| constant     |             |                                            | 1                       |
| linear_decay | end_factor  | decay_steps (0 = max_steps)                | 1 -> end_factor, linear |
| step         | milestones  | decay_factor (0.1)                         | decay_factor ** #(milestones <= epoch) |
| cosine       |             | end_factor (0), decay_steps (0 = max_steps) | 1 -> end_factor, half cosine |
| polynomial   |             | end_factor (0), power (2), decay_steps (0 = max_steps) | end + (1 - end)(1 - t/T)^power |

`milestones` are in epochs and may be a tuple/list of numbers or a comma-separated
string ("60,120,160"), since search-space values are scalars and TOML gives strings or
arrays; a single number is one milestone.

Warm-up: every schedule X also exists as `warmup_X` (e.g. `warmup_step`,
`warmup_cosine`), which multiplies X's factor by Goyal et al.'s gradual linear warm-up

    w(epoch) = s + (1 - s) * epoch / warmup_epochs   for epoch < warmup_epochs, else 1

with `warmup_epochs` (default 5, as in Goyal et al.) and `warmup_start_factor` s
(default 0). Goyal et al. start at the small-batch learning rate, i.e. s = 1/k when the
batch (and the target learning rate) is k times the reference; set it per cell with
`trainers.scaling.goyal_warmup_start_factor(batch_size, base_batch_size)`. The inner
schedule runs on the same clock (it is not delayed by the warm-up), so e.g. a cosine
decay spans the whole budget, warm-up included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

LrFactor = Callable[[int, float], float]

# Goyal et al. 2017: the warm-up lasts 5 epochs.
GOYAL_WARMUP_EPOCHS = 5.0


@dataclass(frozen=True)
class ScheduleSpec:
    factory: Callable[[Mapping[str, float], int], LrFactor]
    required: tuple[str, ...]
    optional: Mapping[str, float]

    def __post_init__(self) -> None:
        # Registry entries are shared by every trial in the process: lock the defaults.
        object.__setattr__(self, "optional", MappingProxyType(dict(self.optional)))

    def build(self, hparams: Mapping[str, float], *, max_steps: int) -> LrFactor:
        missing = [name for name in self.required if name not in hparams]
        if missing:
            raise ValueError(f"missing schedule hyperparameters: {', '.join(missing)}")
        values = {**self.optional, **{k: v for k, v in hparams.items()
                                      if k in self.required or k in self.optional}}
        return self.factory(values, max_steps)

    @property
    def hparam_names(self) -> tuple[str, ...]:
        """Every hyperparameter this schedule reads (search spaces may name these)."""
        return (*self.required, *self.optional)


def parse_milestones(value) -> tuple[float, ...]:
    """Milestones (epochs) from a number, a sequence of numbers or a "60,120,160" string;
    returned sorted ascending. Raises ValueError on a negative or unreadable entry."""
    if isinstance(value, str):
        items = [item for item in value.replace(" ", "").split(",") if item]
    elif isinstance(value, (int, float)):
        items = [value]
    else:
        items = list(value)
    try:
        milestones = tuple(sorted(float(item) for item in items))
    except (TypeError, ValueError):
        raise ValueError(f"milestones must be numbers (epochs), got {value!r}") from None
    if any(m < 0 or not math.isfinite(m) for m in milestones):
        raise ValueError(f"milestones must be finite and >= 0, got {value!r}")
    return milestones


def _decay_steps(hp: Mapping[str, float], max_steps: int) -> int:
    steps = int(hp.get("decay_steps") or max_steps)
    if steps <= 0:
        raise ValueError(f"decay_steps must be positive, got {steps}")
    return steps


def _constant(hp: Mapping[str, float], max_steps: int) -> LrFactor:
    return lambda step, epoch: 1.0


def _linear_decay(hp: Mapping[str, float], max_steps: int) -> LrFactor:
    """Shallue et al.: decay linearly from 1 to `end_factor` over `decay_steps` updates
    (default: the whole step budget), then stay at `end_factor`."""
    end_factor = float(hp["end_factor"])
    decay_steps = _decay_steps(hp, max_steps)

    def factor(step: int, epoch: float) -> float:
        progress = min(step, decay_steps) / decay_steps
        return 1.0 - (1.0 - end_factor) * progress
    return factor


def _step(hp: Mapping[str, float], max_steps: int) -> LrFactor:
    """Multiply by `decay_factor` at each milestone (epochs; from `epoch >= milestone`)."""
    milestones = parse_milestones(hp["milestones"])
    decay_factor = float(hp["decay_factor"])
    if decay_factor <= 0:
        raise ValueError(f"decay_factor must be positive, got {decay_factor}")

    def factor(step: int, epoch: float) -> float:
        return decay_factor ** sum(1 for m in milestones if epoch >= m)
    return factor


def _cosine(hp: Mapping[str, float], max_steps: int) -> LrFactor:
    """Half cosine from 1 to `end_factor` over `decay_steps` updates, then flat."""
    end_factor = float(hp["end_factor"])
    decay_steps = _decay_steps(hp, max_steps)

    def factor(step: int, epoch: float) -> float:
        progress = min(step, decay_steps) / decay_steps
        return end_factor + (1.0 - end_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def _polynomial(hp: Mapping[str, float], max_steps: int) -> LrFactor:
    """LARS (You et al. 2017): (1 - t/T)^power, power 2, from 1 to `end_factor`."""
    end_factor, power = float(hp["end_factor"]), float(hp["power"])
    decay_steps = _decay_steps(hp, max_steps)

    def factor(step: int, epoch: float) -> float:
        remaining = 1.0 - min(step, decay_steps) / decay_steps
        return end_factor + (1.0 - end_factor) * remaining ** power
    return factor


def _with_warmup(inner: ScheduleSpec) -> ScheduleSpec:
    """`inner` times a linear warm-up from `warmup_start_factor` to 1 over `warmup_epochs`."""
    def factory(hp: Mapping[str, float], max_steps: int) -> LrFactor:
        warmup_epochs = float(hp["warmup_epochs"])
        start = float(hp["warmup_start_factor"])
        if warmup_epochs < 0 or not 0.0 <= start <= 1.0:
            raise ValueError("warmup_epochs must be >= 0 and warmup_start_factor in [0, 1]")
        schedule = inner.factory(hp, max_steps)

        def factor(step: int, epoch: float) -> float:
            if epoch >= warmup_epochs:
                return schedule(step, epoch)
            return (start + (1.0 - start) * epoch / warmup_epochs) * schedule(step, epoch)
        return factor
    optional = {**inner.optional, "warmup_epochs": GOYAL_WARMUP_EPOCHS, "warmup_start_factor": 0.0}
    return ScheduleSpec(factory, inner.required, optional)


def _registry(entries: Iterable[tuple[str, ScheduleSpec]]) -> Mapping[str, ScheduleSpec]:
    table: dict[str, ScheduleSpec] = {}
    for name, spec in entries:
        if name in table:
            raise ValueError(f"duplicate schedule name {name!r}")
        table[name] = spec
    return MappingProxyType(table)


_BASE_SCHEDULES: tuple[tuple[str, ScheduleSpec], ...] = (
    ("constant", ScheduleSpec(_constant, (), {})),
    ("linear_decay", ScheduleSpec(_linear_decay, ("end_factor",), {"decay_steps": 0})),
    ("step", ScheduleSpec(_step, ("milestones",), {"decay_factor": 0.1})),
    ("cosine", ScheduleSpec(_cosine, (), {"end_factor": 0.0, "decay_steps": 0})),
    ("polynomial", ScheduleSpec(_polynomial, (), {"end_factor": 0.0, "power": 2.0,
                                                  "decay_steps": 0})),
)

SCHEDULES: Mapping[str, ScheduleSpec] = _registry([
    *_BASE_SCHEDULES,
    *((f"warmup_{name}", _with_warmup(spec)) for name, spec in _BASE_SCHEDULES),
])


def get_schedule(name: str) -> ScheduleSpec:
    try:
        return SCHEDULES[name]
    except KeyError:
        raise KeyError(f"unknown schedule {name!r}; choose one of: {', '.join(sorted(SCHEDULES))}") from None
