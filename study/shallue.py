"""Reader of Shallue et al.'s published measurements into batchlab's analysis frames.

The archive (`batch_science_data.tar.bz2`, spec/shallue-data-format.md) holds
`.../dataset/model/optimizer/batch_size/study.json` and, per trial,
`.../<trial_id>/metadata.json` and `.../<trial_id>/measurements.csv`. It is read either
from an unpacked folder or straight from the .tar.bz2, streamed member by member
(tarfile's "r|bz2" mode: no seeking, nothing unpacked to disk); `prefix` restricts the
read to one workload, which is what keeps the 800 MB archive manageable.

What becomes of each trial status:
- COMPLETE: eligible (outcome `reached` / `not_reached` when a goal is given; without a
  goal every COMPLETE trial is `not_reached`, which only means "eligible": steps-to-result
  is computed from the measurements either way).
- INFEASIBLE (training diverged): outcome `diverged`; never wins.
- INCOMPLETE: ignored.

`num_trials=N` keeps the first N COMPLETE trials of each study by integer trial id,
exactly as the authors' `data_loader.load_study` (it fails when a study has fewer).
INFEASIBLE trials are kept when their id is below the last kept COMPLETE trial's id,
i.e. those the search drew within the same span (they never change steps-to-result).

Frames (the analysis contract): `cells` (cell_id = the study's folder path, batch_size,
optimizer, schedule "published", dataset, model, train_steps, early_stopping,
search_space), `trials` (cell_id, trial_id = "<cell_id>/<trial id>", trial_number = the
integer trial id, outcome, status, hparams, steps_to_result) and `measurements`
(trial_id, step, examples = batch_size * step, wall_seconds = NaN, and the metric columns:
val/classification_error -> val_error, val/cross_entropy_error -> val_loss,
train/cross_entropy_error -> train_loss, train/classification_error -> train_error,
any other "a/b" -> "a_b").
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import pandas as pd

from study.analysis.steps import first_beating_rows

METRIC_NAMES = {
    "val/classification_error": "val_error",
    "val/cross_entropy_error": "val_loss",
    "train/cross_entropy_error": "train_loss",
    "train/classification_error": "train_error",
}
SCALES = {"LOG_SCALE": "log", "LINEAR_SCALE": "linear", "REVERSE_LOG_SCALE": "reverse_log",
          "": "linear"}
STUDY_FILE, METADATA_FILE, MEASUREMENTS_FILE = "study.json", "metadata.json", "measurements.csv"


@dataclass(frozen=True)
class ShallueData:
    """The imported cells, trials and measurements frames (see the module docstring)."""
    cells: pd.DataFrame
    trials: pd.DataFrame
    measurements: pd.DataFrame


@dataclass(frozen=True)
class Goal:
    """A target: `metric` (a batchlab column name, e.g. "val_error"), `threshold`, and
    `mode` "min" (strictly below wins) or "max" (strictly above wins)."""
    metric: str
    threshold: float
    mode: str = "min"


def search_space(parameter_configs: dict) -> dict:
    """study.json's parameter_configs as a batchlab search space: DOUBLE ->
    {low, high, scale: log | linear | reverse_log}, INTEGER -> {low, high, scale:
    integer}, DISCRETE -> {choices, scale: choices}."""
    space = {}
    for name, config in parameter_configs.items():
        kind = config.get("type")
        if kind == "DISCRETE":
            space[name] = {"choices": list(config["feasible_points"]), "scale": "choices"}
        elif kind in ("DOUBLE", "INTEGER"):
            scale = "integer" if kind == "INTEGER" else SCALES[config.get("scale", "")]
            space[name] = {"low": config["min_value"], "high": config["max_value"], "scale": scale}
        else:
            raise ValueError(f"parameter {name!r}: unknown parameter type {kind!r}")
    return space


def _iter_folder(root: Path, prefix: str) -> Iterator[tuple[str, bytes]]:
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder, name)
            relative = path.relative_to(root).as_posix()
            if relative.startswith(prefix):
                yield relative, path.read_bytes()


def _iter_tar(archive: Path, prefix: str) -> Iterator[tuple[str, bytes]]:
    # "r|*" streams: members are read in archive order, once, without seeking.
    with tarfile.open(archive, mode="r|*") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if member.isfile() and name.startswith(prefix):
                yield name, tar.extractfile(member).read()


def iter_archive_files(source: str | os.PathLike, prefix: str = "") -> Iterator[tuple[str, bytes]]:
    """(posix path relative to the archive root, file bytes) of every file under
    `prefix`, from a folder or a tar archive (.tar, .tar.bz2, .tar.gz)."""
    source = Path(source)
    if source.is_dir():
        return _iter_folder(source, prefix)
    if source.is_file():
        return _iter_tar(source, prefix)
    raise FileNotFoundError(f"no Shallue et al. data at {source}")


def collect_studies(files: Iterator[tuple[str, bytes]]) -> dict[str, dict]:
    """Group files by study folder: {study_dir: {"study": dict, "trials": {trial id (int):
    {"metadata": dict, "measurements": bytes}}}}. Files of other names are skipped, and so
    are trial folders whose name is not an integer."""
    studies: dict[str, dict] = {}
    for name, data in files:
        path = PurePosixPath(name)
        if path.name == STUDY_FILE:
            studies.setdefault(str(path.parent), {"trials": {}})["study"] = json.loads(data)
        elif path.name in (METADATA_FILE, MEASUREMENTS_FILE) and path.parent.name.isdigit():
            study = studies.setdefault(str(path.parent.parent), {"trials": {}})
            trial = study["trials"].setdefault(int(path.parent.name), {})
            trial["metadata" if path.name == METADATA_FILE else "measurements"] = (
                json.loads(data) if path.name == METADATA_FILE else data)
    return {key: value for key, value in studies.items() if "study" in value}


def select_trials(trials: dict[int, dict], num_trials: int | None, *,
                  include_infeasible: bool = True, where: str = "") -> list[int]:
    """Trial ids to import, ascending: COMPLETE ones (the first `num_trials` by integer
    id when given) and, if `include_infeasible`, INFEASIBLE ones below the last kept
    COMPLETE id. INCOMPLETE trials never."""
    ids = sorted(t for t in trials if "metadata" in trials[t])
    complete = [t for t in ids if trials[t]["metadata"]["status"] == "COMPLETE"]
    if num_trials is not None:
        if len(complete) < num_trials:
            raise ValueError(f"requested {num_trials} COMPLETE trials, but {where or 'a study'}"
                             f" has only {len(complete)}")
        complete = complete[:num_trials]
    last = complete[-1] if num_trials is not None and complete else float("inf")
    infeasible = [t for t in ids if include_infeasible and t < last
                  and trials[t]["metadata"]["status"] == "INFEASIBLE"]
    return sorted(complete + infeasible)


def _measurement_frame(data: bytes, trial_id: str, batch_size: int) -> pd.DataFrame:
    # A non-finite value is no measurement (the importer stores it as NULL): it never
    # beats a goal and is no best value.
    frame = pd.read_csv(io.BytesIO(data)).replace([np.inf, -np.inf], np.nan)
    frame = frame.rename(columns={c: METRIC_NAMES.get(c, c.replace("/", "_")) for c in frame})
    return frame.assign(trial_id=trial_id, examples=frame["step"] * batch_size,
                        wall_seconds=np.nan)


def _cell_row(cell_id: str, study: dict) -> dict:
    return {"cell_id": cell_id, "batch_size": int(study["batch_size"]),
            "optimizer": study.get("optimizer"), "schedule": "published",
            "dataset": study.get("dataset"), "model": study.get("model"),
            "train_steps": study.get("train_steps"), "early_stopping": study.get("early_stopping"),
            "search_space": search_space(study.get("parameter_configs", {}))}


def _study_frames(cell_id: str, study: dict, num_trials: int | None, include_infeasible: bool):
    batch_size = int(study["study"]["batch_size"])
    trials, measurements = [], []
    for number in select_trials(study["trials"], num_trials,
                                include_infeasible=include_infeasible, where=cell_id):
        trial = study["trials"][number]
        trial_id = f"{cell_id}/{number}"
        status = trial["metadata"]["status"]
        trials.append({"cell_id": cell_id, "trial_id": trial_id, "trial_number": number,
                       "status": status,
                       "outcome": "not_reached" if status == "COMPLETE" else "diverged",
                       "hparams": dict(trial["metadata"].get("parameters", {}))})
        if "measurements" in trial:
            measurements.append(_measurement_frame(trial["measurements"], trial_id, batch_size))
    return trials, measurements


def apply_goal(trials: pd.DataFrame, measurements: pd.DataFrame, goal: Goal) -> pd.DataFrame:
    """Label COMPLETE trials `reached` / `not_reached` for `goal` and fill each trial's
    `steps_to_result` (its first evaluated step strictly beating the goal; NaN if none)."""
    firsts = first_beating_rows(trials, measurements, metric=goal.metric,
                                threshold=goal.threshold, mode=goal.mode)
    first_step = trials["trial_id"].map(firsts.set_index("trial_id")["step"])
    reached = first_step.notna() & (trials["status"] == "COMPLETE")
    outcome = np.where(reached, "reached", trials["outcome"])
    return trials.assign(outcome=outcome, steps_to_result=first_step.astype(float))


def read_shallue(source: str | os.PathLike, *, prefix: str = "", num_trials: int | None = None,
                 include_infeasible: bool = True, goal: Goal | None = None) -> ShallueData:
    """Read the published data from a folder or a .tar.bz2 into cells, trials and
    measurements frames (module docstring). `prefix` (e.g. "mnist/simple_cnn/") limits
    the read to files under it; `num_trials` keeps the first N COMPLETE trials per study
    by integer trial id; `goal` labels trials reached / not_reached."""
    studies = collect_studies(iter_archive_files(source, prefix))
    cells, trials, measurements = [], [], []
    for cell_id in sorted(studies):
        cells.append(_cell_row(cell_id, studies[cell_id]["study"]))
        rows, frames = _study_frames(cell_id, studies[cell_id], num_trials, include_infeasible)
        trials.extend(rows)
        measurements.extend(frames)
    trials_frame = pd.DataFrame(trials, columns=["cell_id", "trial_id", "trial_number",
                                                 "status", "outcome", "hparams"])
    trials_frame["steps_to_result"] = np.nan
    measurements_frame = (pd.concat(measurements, ignore_index=True) if measurements else
                          pd.DataFrame(columns=["trial_id", "step", "examples", "wall_seconds"]))
    if goal is not None:
        trials_frame = apply_goal(trials_frame, measurements_frame, goal)
    return ShallueData(cells=pd.DataFrame(cells), trials=trials_frame,
                       measurements=measurements_frame)
