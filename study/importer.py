"""`batchlab import-shallue`: Shallue et al.'s published measurements into batchlab's tables.

The archive (spec/shallue-data-format.md) is read as a stream (`tarfile` "r|*" on a
.tar.bz2, or a walk of the unpacked folder) and written one study at a time: a study
(one optimizer at one batch size) becomes one cell, inserted with its trials and
measurements in one transaction, so memory holds one study and an interrupted import
leaves only whole cells behind. The released archive, like any tar of a folder tree,
holds each study's files together; an archive that does not is refused with a hint to
unpack it.

Mapping (documented in docs/analysis.md and docs/sql.md):
- campaign `shallue/<path>` per dataset/model folder (`shallue/mnist/simple_cnn`,
  `shallue/imagenet_subsets/imagenet_half_classes/resnet_50`); `workload` is that path,
  `sampler` "imported", `spec` records the import (source, options, per-cell search
  spaces, evaluation intervals) and `spec_text` is a TOML comment: there is nothing to run.
  Target: the paper's Figure-1 goal of the workload (`FIGURE1_GOALS`), or
  --target-metric/--threshold; a workload without either is skipped (and reported).
- cell per study: batch size, optimizer, schedule "published", study_name
  "imported:shallue/<study folder>", trials_planned = trials_claimed = trials imported.
- trial per selected trial: trial_number = the published integer trial id (the order of
  "first N trials by trial id"), optuna_trial_id = -1 (no Optuna study exists), outcome
  reached / not_reached (COMPLETE, by the campaign target) or diverged (INFEASIBLE);
  INCOMPLETE trials are skipped unless --include-incomplete (then eligible like COMPLETE).
  `config` keeps the status, the study folder and the published steps.
- measurement per CSV row: val/classification_error -> val_error, val/cross_entropy_error
  -> val_loss, train/cross_entropy_error -> train_loss, every other column into `extra`
  (named as study.shallue names them, e.g. test_classification_error); examples =
  batch size x step; epoch 0 and wall/eval seconds 0 (not published); learning_rate is the
  trial's base learning rate (the schedule is not re-evaluated).
- Re-running is idempotent: existing cells are skipped, so nothing changes; a campaign
  imported with other options (N, target, INCOMPLETE) is refused (ImportConflict).
"""
from __future__ import annotations

import json
import math
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

import numpy as np
import pandas as pd
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.orm import Session

from db.models import IMPORTED_SAMPLER, Campaign, Cell, Measurement, Trial, utcnow
from db.schema import ensure_schema
from study.analysis.steps import beats
from study.shallue import (MEASUREMENTS_FILE, METADATA_FILE, STUDY_FILE, Goal, _measurement_frame,
                           search_space)

# The goals of the paper's Figure 1 (spec/shallue-data-format.md), by dataset/model folder.
FIGURE1_GOALS: dict[str, Goal] = {
    "mnist/simple_cnn": Goal("val_error", 0.01),
    "fashion_mnist/simple_cnn": Goal("val_error", 0.1),
    "cifar_10/resnet_8": Goal("val_error", 0.3),
    "imagenet/resnet_50": Goal("val_error", 0.25),
    "imagenet/vgg_11": Goal("val_error", 0.35),
    "open_images/resnet_50": Goal("val_average_precision", 0.31, "max"),
    "lm1b/transformer": Goal("val_loss", 3.9),
    "common_crawl/transformer": Goal("val_loss", 3.9),
    "lm1b/lstm": Goal("val_loss", 3.9),
}
COLUMNS = ("train_loss", "val_loss", "val_error")  # bl_measurements' own metric columns
SCHEDULE = "published"
MAX_WARNINGS_SHOWN = 20


class ShallueImportError(Exception):
    """A user error of the import (bad path, unordered archive, conflicting options)."""


class ImportConflict(ShallueImportError):
    """The campaign exists from an import with other options."""


@dataclass(frozen=True)
class ImportOptions:
    first_n_trials: int | None = None
    include_incomplete: bool = False
    target_metric: str | None = None
    threshold: float | None = None
    mode: str | None = None  # "min" / "max"; default: max for *precision/*accuracy metrics
    prefix: str = ""

    def goal_for(self, workload: str) -> Goal | None:
        if self.target_metric is not None and self.threshold is not None:
            mode = self.mode or ("max" if self.target_metric.endswith(("precision", "accuracy"))
                                 else "min")
            return Goal(self.target_metric, self.threshold, mode)
        return FIGURE1_GOALS.get(workload)


@dataclass
class ImportStats:
    campaigns: set = field(default_factory=set)
    cells_imported: int = 0
    cells_skipped: int = 0  # already in the database
    trials: int = 0
    measurements: int = 0
    skipped_workloads: set = field(default_factory=set)  # no goal
    studies: int = 0  # found in the source (under the prefix), imported or not
    warnings: list = field(default_factory=list)


# ---- reading the archive as a stream of studies ----------------------------------------
def _study_dir(name: str) -> str | None:
    """The study folder a file belongs to (None for files outside any study)."""
    path = PurePosixPath(name)
    if path.name == STUDY_FILE:
        return str(path.parent)
    if path.name in (METADATA_FILE, MEASUREMENTS_FILE) and path.parent.name.isdigit():
        return str(path.parent.parent)
    return None


class _Source:
    """Files of the archive in order, with a progress fraction (bytes read / size)."""

    def __init__(self, source: Path, prefix: str):
        self.source, self.prefix = source, prefix
        self._raw = None
        self.total = source.stat().st_size if source.is_file() else 0

    def fraction(self) -> float | None:
        if self._raw is None or not self.total:
            return None
        if self._raw.closed:  # the whole archive has been read
            return 1.0
        return min(1.0, self._raw.tell() / self.total)

    def files(self) -> Iterator[tuple[str, bytes]]:
        if self.source.is_dir():
            yield from self._folder()
        else:
            yield from self._tar()

    def _folder(self) -> Iterator[tuple[str, bytes]]:
        for folder, dirs, files in os.walk(self.source):
            dirs.sort(key=lambda d: (not d.isdigit(), int(d) if d.isdigit() else 0, d))
            for name in sorted(files):
                relative = Path(folder, name).relative_to(self.source).as_posix()
                if relative.startswith(self.prefix):
                    yield relative, Path(folder, name).read_bytes()

    def _tar(self) -> Iterator[tuple[str, bytes]]:
        with open(self.source, "rb") as raw:
            self._raw = raw
            try:
                with tarfile.open(fileobj=raw, mode="r|*") as tar:
                    for member in tar:
                        name = member.name.removeprefix("./")
                        if member.isfile() and name.startswith(self.prefix):
                            yield name, tar.extractfile(member).read()
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise ShallueImportError(f"{self.source}: not a readable tar archive ({exc})") from None


def iter_studies(files: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, dict]]:
    """(study folder, {"study": dict, "trials": {id: {"metadata", "measurements"}}}) for
    each study, as soon as the stream has moved past it (bounded memory)."""
    current, study, finished = None, None, set()
    for name, data in files:
        folder = _study_dir(name)
        if folder is None:
            continue
        if folder != current:
            if current is not None and "study" in study:
                yield current, study
            if current is not None:
                finished.add(current)
            if folder in finished:
                raise ShallueImportError(f"the archive's files of study {folder!r} are not stored "
                                   f"together; unpack it and import the folder instead")
            current, study = folder, {"trials": {}}
        path = PurePosixPath(name)
        if path.name == STUDY_FILE:
            study["study"] = json.loads(data)
        else:
            trial = study["trials"].setdefault(int(path.parent.name), {})
            trial["metadata" if path.name == METADATA_FILE else "measurements"] = (
                json.loads(data) if path.name == METADATA_FILE else data)
    if current is not None and study is not None and "study" in study:
        yield current, study


# ---- selecting trials: "first N by trial id" -------------------------------------------------
def select_trial_ids(trials: dict[int, dict], first_n: int | None, include_incomplete: bool,
                     where: str, warn: Callable[[str], None]) -> list[int]:
    """Eligible trials (COMPLETE, and INCOMPLETE when asked), the first `first_n` by
    integer id, plus the INFEASIBLE trials with an id below the last kept eligible one
    (the same span of the search; they never change steps-to-result). A study with fewer
    than `first_n` eligible trials keeps all of them, with a warning."""
    statuses = ("COMPLETE", "INCOMPLETE") if include_incomplete else ("COMPLETE",)
    ids = sorted(t for t in trials if "metadata" in trials[t])
    eligible = [t for t in ids if trials[t]["metadata"].get("status") in statuses]
    last = math.inf
    if first_n is not None:
        if len(eligible) < first_n:
            warn(f"{where}: only {len(eligible)} eligible trials (< {first_n}); all are kept")
        else:
            eligible = eligible[:first_n]
            last = eligible[-1] if eligible else math.inf
    infeasible = [t for t in ids if t < last and trials[t]["metadata"].get("status") == "INFEASIBLE"]
    return sorted(eligible + infeasible)


# ---- rows ----------------------------------------------------------------------------
def _number_or_none(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _first_beating_step(frame: pd.DataFrame, goal: Goal) -> int | None:
    if frame is None or goal.metric not in frame.columns:
        return None
    values = frame[goal.metric].to_numpy(float)
    # As stored: a non-finite value is NULL, which never beats the goal.
    beating = beats(values, goal.threshold, goal.mode) & np.isfinite(values)
    steps = frame["step"].to_numpy()[beating]
    return int(steps.min()) if steps.size else None


def _best_value(frame: pd.DataFrame | None, goal: Goal) -> float | None:
    if frame is None or goal.metric not in frame.columns:
        return None
    values = frame[goal.metric].to_numpy(float)
    values = values[np.isfinite(values)]
    if not values.size:
        return None
    return float(values.min() if goal.mode == "min" else values.max())


def _measurement_rows(frame: pd.DataFrame, trial_row_id: int, batch_size: int,
                      learning_rate: float) -> list[dict]:
    extra_columns = [c for c in frame.columns
                     if c not in (*COLUMNS, "step", "examples", "wall_seconds", "trial_id")]
    rows = []
    for record in frame.to_dict("records"):
        extra = {c: v for c in extra_columns if (v := _number_or_none(record[c])) is not None}
        step = int(record["step"])
        rows.append({"trial_id": trial_row_id, "step": step, "examples": step * batch_size,
                     "epoch": 0.0, "wall_seconds": 0.0, "eval_seconds": 0.0,
                     "learning_rate": learning_rate, "batch_size": batch_size,
                     "train_loss": _number_or_none(record.get("train_loss")),
                     "val_loss": _number_or_none(record.get("val_loss")),
                     "val_error": _number_or_none(record.get("val_error")), "extra": extra})
    return rows


def _intervals(frame: pd.DataFrame | None) -> Counter:
    if frame is None or len(frame) < 2:
        return Counter()
    steps = np.sort(frame["step"].to_numpy(np.int64))
    return Counter(int(d) for d in np.diff(steps) if d > 0)


def _space_params(space: dict) -> list[dict]:
    """study.shallue's search space as spec-style params (what the edge check reads)."""
    out = []
    for name, entry in space.items():
        if "low" not in entry:
            continue
        scale = entry["scale"]
        out.append({"name": name, "low": float(entry["low"]), "high": float(entry["high"]),
                    "scale": "linear" if scale == "integer" else scale,
                    "integer": scale == "integer"})
    return out


# ---- the import ---------------------------------------------------------------------------
class ShallueImporter:
    """Writes studies into the database as they stream by (module docstring)."""

    def __init__(self, engine: Engine, source: str | os.PathLike, options: ImportOptions,
                 log: Callable[[str], None] = print, progress_seconds: float = 5.0):
        self.engine, self.options, self.log = engine, options, log
        self.source = Path(source)
        if not self.source.exists():
            raise ShallueImportError(f"{self.source}: no such file or folder (expected the "
                               f"batch_science_data.tar.bz2 archive or its unpacked folder)")
        self.stats = ImportStats()
        self.progress_seconds = progress_seconds
        self._campaigns: dict[str, dict] = {}  # name -> {"id", "spaces", "intervals", ...}
        self._started = self._last_progress = time.monotonic()

    def run(self) -> ImportStats:
        reader = _Source(self.source, self.options.prefix)
        for folder, study in iter_studies(reader.files()):
            if not self.stats.studies:  # a source without studies writes nothing
                ensure_schema(self.engine)
            self.stats.studies += 1
            self._import_study(folder, study)
            self._progress(reader)
        if self.stats.studies:  # else the caller reports that there was nothing to import
            self._progress(reader, force=True)
        return self.stats

    def _warn(self, text: str) -> None:
        self.stats.warnings.append(text)
        if len(self.stats.warnings) <= MAX_WARNINGS_SHOWN:
            self.log(f"warning: {text}")

    def _progress(self, reader: _Source, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress < self.progress_seconds:
            return
        self._last_progress = now
        fraction = reader.fraction()
        share = f"{fraction:.0%} of the archive read, " if fraction is not None else ""
        s = self.stats
        self.log(f"{share}{s.cells_imported} cells imported ({s.cells_skipped} already there), "
                 f"{s.trials} trials, {s.measurements} measurements, {now - self._started:.0f} s")

    def _import_study(self, folder: str, study: dict) -> None:
        parts = folder.split("/")
        if len(parts) < 4:
            self._warn(f"{folder}: not under dataset/model/optimizer/batch_size; skipped")
            return
        workload = "/".join(parts[:-2])
        goal = self.options.goal_for(workload)
        if goal is None:
            if workload not in self.stats.skipped_workloads:
                self.stats.skipped_workloads.add(workload)
                self._warn(f"{workload}: no Figure-1 goal known; give --target-metric and "
                           f"--threshold (with --prefix {workload}/) to import it")
            return
        info = study["study"]
        batch_size, optimizer = int(info["batch_size"]), str(info.get("optimizer") or parts[-2])
        campaign = self._campaign(workload, goal)
        campaign["spaces"][f"{optimizer}/{batch_size}"] = _space_params(
            search_space(info.get("parameter_configs", {})))
        ids = select_trial_ids(study["trials"], self.options.first_n_trials,
                               self.options.include_incomplete, folder, self._warn)
        frames = {t: _measurement_frame(study["trials"][t]["measurements"], str(t), batch_size)
                  for t in ids if "measurements" in study["trials"][t]}
        for frame in frames.values():
            campaign["intervals"].update(_intervals(frame))
        campaign["max_step"] = max([campaign["max_step"], *(int(f["step"].max()) for f in frames.values()
                                                            if len(f))])
        campaign["max_trials"] = max(campaign["max_trials"], len(ids))
        if self._cell_exists(campaign["id"], folder):
            self.stats.cells_skipped += 1
        else:
            self._write_cell(campaign["id"], folder, info, optimizer, batch_size, ids, study, frames, goal)
        self._update_campaign(campaign)

    def _campaign(self, workload: str, goal: Goal) -> dict:
        name = f"shallue/{workload}"
        if name in self._campaigns:
            return self._campaigns[name]
        settings = {"source": "Shallue et al. 2018 (batch_science_data)",
                    "first_n_trials": self.options.first_n_trials,
                    "include_incomplete": self.options.include_incomplete,
                    "target": {"metric": goal.metric, "threshold": goal.threshold, "mode": goal.mode}}
        with Session(self.engine) as session, session.begin():
            row = session.scalar(select(Campaign).where(Campaign.name == name))
            if row is None:
                row = Campaign(name=name, workload=workload, target_metric=goal.metric,
                               target_threshold=goal.threshold, target_mode=goal.mode,
                               eval_every=1, max_steps=0, trials_per_cell=0,
                               sampler=IMPORTED_SAMPLER, spec={"import": settings},
                               spec_text=f"# {name}: imported from Shallue et al. 2018 by "
                                         f"`batchlab import-shallue`; no trials to run\n")
                session.add(row)
                session.flush()
            elif not isinstance(row.spec, dict) or row.spec.get("import") != settings:
                raise ImportConflict(
                    f"campaign {name!r} already exists with other import options "
                    f"({json.dumps((row.spec or {}).get('import'))}); import into another "
                    f"--storage or use the same options")
            self._campaigns[name] = {"id": row.id, "name": name, "settings": settings,
                                     "spaces": dict((row.spec or {}).get("cell_spaces", {})),
                                     "intervals": Counter(), "max_step": 0, "max_trials": 0}
            self.stats.campaigns.add(name)
        return self._campaigns[name]

    def _cell_exists(self, campaign_id: int, folder: str) -> bool:
        with Session(self.engine) as session:
            return session.scalar(select(Cell.id).where(
                Cell.study_name == f"imported:shallue/{folder}")) is not None

    def _write_cell(self, campaign_id, folder, info, optimizer, batch_size, ids, study, frames,
                    goal) -> None:
        """One cell with its trials and measurements, in one transaction."""
        now = utcnow()
        with Session(self.engine) as session, session.begin():
            cell = Cell(campaign_id=campaign_id, batch_size=batch_size, optimizer=optimizer,
                        schedule=SCHEDULE, study_name=f"imported:shallue/{folder}",
                        trials_planned=len(ids), trials_claimed=len(ids))
            session.add(cell)
            session.flush()
            trial_rows = [self._trial_row(cell.id, folder, t, study["trials"][t]["metadata"],
                                          frames.get(t), batch_size, goal, now) for t in ids]
            if trial_rows:
                session.execute(insert(Trial), trial_rows)
            row_ids = dict(session.execute(select(Trial.trial_number, Trial.id)
                                           .where(Trial.cell_id == cell.id)).all())
            count = 0
            for t, frame in frames.items():
                lr = _number_or_none(study["trials"][t]["metadata"].get("parameters", {})
                                     .get("learning_rate")) or 0.0
                rows = _measurement_rows(frame, row_ids[t], batch_size, lr)
                if rows:
                    session.execute(insert(Measurement), rows)
                    count += len(rows)
        self.stats.cells_imported += 1
        self.stats.trials += len(ids)
        self.stats.measurements += count

    def _trial_row(self, cell_id, folder, number, metadata, frame, batch_size, goal, now) -> dict:
        status = metadata.get("status")
        first = None if status == "INFEASIBLE" else _first_beating_step(frame, goal)
        outcome = "diverged" if status == "INFEASIBLE" else ("reached" if first is not None
                                                             else "not_reached")
        steps = metadata.get("steps")
        steps = int(steps) if isinstance(steps, (int, float)) else (
            int(frame["step"].max()) if frame is not None and len(frame) else None)
        return {"cell_id": cell_id, "optuna_trial_id": -1, "trial_number": int(number),
                "outcome": outcome, "hparams": dict(metadata.get("parameters", {})),
                "config": {"source": "shallue2018", "study": folder, "status": status,
                           "published_steps": metadata.get("steps"), "batch_size": batch_size},
                "seed": 0, "steps": steps,
                "examples": steps * batch_size if steps is not None else None,
                "wall_seconds": None, "steps_to_result": first,
                "examples_to_result": first * batch_size if first is not None else None,
                "seconds_to_result": None, "best_metric": _best_value(frame, goal),
                "message": f"imported from Shallue et al. 2018 (status {status})",
                "worker_id": None, "device": "", "host": "", "code_version": "shallue2018",
                "package_versions": {}, "started_at": now, "finished_at": now,
                "heartbeat_at": None, "attempt": 1, "attempt_of": None}

    def _update_campaign(self, campaign: dict) -> None:
        """Campaign-level facts that grow with every study: per-cell search spaces, the most
        common evaluation interval (they vary: all are listed), the largest step and the
        largest cell. Written only when they change, so a re-run writes nothing."""
        intervals = campaign["intervals"]
        with Session(self.engine) as session, session.begin():
            row = session.get(Campaign, campaign["id"])
            spec = dict(row.spec or {})
            eval_intervals = dict(spec.get("eval_intervals") or {})
            for interval, count in intervals.items():
                eval_intervals[str(interval)] = max(eval_intervals.get(str(interval), 0), count)
            ranked = sorted(eval_intervals.items(), key=lambda kv: (-kv[1], int(kv[0])))
            new_spec = {**spec, "cell_spaces": campaign["spaces"],
                        "eval_intervals": dict(ranked[:10]),
                        "spaces": _union_spaces(campaign["spaces"])}
            values = {"spec": new_spec,
                      "eval_every": int(ranked[0][0]) if ranked else row.eval_every,
                      "max_steps": max(row.max_steps, campaign["max_step"]),
                      "trials_per_cell": max(row.trials_per_cell, campaign["max_trials"])}
            if any(getattr(row, k) != v for k, v in values.items()):
                session.execute(update(Campaign).where(Campaign.id == row.id).values(**values))


def _union_spaces(cell_spaces: dict) -> dict:
    """Per optimizer, the widest range of each parameter over its batch sizes (the
    dashboard's per-optimizer view; the edge check uses `cell_spaces`)."""
    spaces: dict[str, dict[str, dict]] = {}
    for key, params in sorted(cell_spaces.items()):
        optimizer = key.rsplit("/", 1)[0]
        merged = spaces.setdefault(f"optimizer:{optimizer}", {})
        for param in params:
            if param["name"] in merged:
                old = merged[param["name"]]
                merged[param["name"]] = {**old, "low": min(old["low"], param["low"]),
                                         "high": max(old["high"], param["high"])}
            else:
                merged[param["name"]] = dict(param)
    return {key: list(params.values()) for key, params in spaces.items()}


def import_shallue(engine: Engine, source: str | os.PathLike, options: ImportOptions = ImportOptions(),
                   log: Callable[[str], None] = print) -> ImportStats:
    """Import the archive or folder at `source` (module docstring); returns counts."""
    return ShallueImporter(engine, source, options, log).run()
