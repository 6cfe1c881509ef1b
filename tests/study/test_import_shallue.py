"""`batchlab import-shallue` on small archives in the published layout, with known answers."""
import io
import json

import pandas as pd
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.engine import make_engine
from db.models import Campaign, Cell, Measurement, Trial
from study.cli import main
from study.shallue import Goal, read_shallue
from tests.study.shallue_fixtures import make_tar, write_study

LR = lambda trial_id: {"learning_rate": 0.01 * trial_id, "momentum": 0.99}  # noqa: E731
# Batch 64: id -> (status, [(step, val error)]). Integer order 1, 2, 3, 4, 10, 11 differs from
# string order; trial 10 is the best but is the 3rd COMPLETE trial.
TRIALS_64 = {
    1: ("COMPLETE", [(100, 0.5), (200, 0.02), (300, 0.009)], LR(1)),   # beats 0.01 at 300
    2: ("INFEASIBLE", [(100, 0.001)], LR(2)),                          # diverged: never wins
    3: ("COMPLETE", [(100, 0.3), (200, 0.008)], LR(3)),                # beats at 200
    4: ("INCOMPLETE", [(100, 0.0001)], LR(4)),                         # ignored
    10: ("COMPLETE", [(100, 0.005), (200, 0.004)], LR(10)),            # beats at 100
    11: ("COMPLETE", [(100, 0.2), (200, 0.1)], LR(11)),
}
TRIALS_128 = {
    5: ("COMPLETE", [(50, 0.1), (100, 0.0099)], LR(5)),
    6: ("COMPLETE", [(50, 0.01), (150, 0.009)], LR(6)),   # 0.01 is not < 0.01: beats at 150
    7: ("COMPLETE", [(50, 0.2)], LR(7)),
}


@pytest.fixture
def archive(tmp_path):
    root = tmp_path / "data"
    write_study(root, "mnist/simple_cnn", "nesterov_momentum", 64, TRIALS_64)
    write_study(root, "mnist/simple_cnn", "nesterov_momentum", 128, TRIALS_128)
    write_study(root, "mnist/simple_cnn", "sgd", 64, {1: ("COMPLETE", [(10, 0.001)], LR(1))})
    write_study(root, "imagenet_subsets/imagenet_half_classes/resnet_50", "nesterov_momentum",
                256, {1: ("COMPLETE", [(1000, 0.2)], LR(1)), 2: ("COMPLETE", [(800, 0.3)], LR(2))})
    ap = pd.DataFrame({"step": [100, 200], "val/average_precision": [0.2, 0.35],
                       "train/cross_entropy_error": [2.0, 1.0]})
    write_study(root, "open_images/resnet_50", "momentum", 1024,
                {3: ("COMPLETE", ap, LR(3))})
    write_study(root, "unknown_set/tiny_net", "sgd", 8, {1: ("COMPLETE", [(5, 0.1)], LR(1))})
    (root / "README.txt").write_text("not part of any study")
    return root, make_tar(root, tmp_path / "batch_science_data.tar.bz2")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def results(capsys, url, campaign) -> pd.DataFrame:
    code, out, _ = run(capsys, "results", "--campaign", campaign, "--format", "json", "--storage", url)
    assert code == 0
    return pd.DataFrame(json.loads(out)).set_index(["optimizer", "batch_size"])


def counts(url) -> tuple[int, int, int, int]:
    with Session(make_engine(url)) as session:
        return tuple(session.scalar(select(func.count()).select_from(t))
                     for t in (Campaign, Cell, Trial, Measurement))


def test_import_maps_names_statuses_columns_and_steps(archive, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    code, out, _ = run(capsys, "import-shallue", str(archive[0]), "--storage", url)
    assert code == 0
    assert "skipped (no goal): imagenet_subsets/imagenet_half_classes/resnet_50, " \
           "unknown_set/tiny_net" in out
    table = results(capsys, url, "shallue/mnist/simple_cnn")
    assert table.loc[("nesterov_momentum", 64), "steps_to_result"] == 100  # trial 10
    assert table.loc[("nesterov_momentum", 64), "winner_trial"] == 10
    assert table.loc[("nesterov_momentum", 64), "examples_to_result"] == 6400
    assert table.loc[("nesterov_momentum", 64), "trials"] == 5  # INCOMPLETE left out
    assert table.loc[("nesterov_momentum", 64), "diverged"] == 1
    assert table.loc[("nesterov_momentum", 128), "steps_to_result"] == 100  # trial 5 (strict <)
    assert table.loc[("sgd", 64), "steps_to_result"] == 10
    # The published data records no time: no seconds to result (not 0), in every format.
    assert table["seconds_to_result"].isna().all()
    code, out, _ = run(capsys, "results", "--campaign", "shallue/mnist/simple_cnn", "--format", "csv",
                       "--storage", url)
    assert code == 0 and (pd.read_csv(io.StringIO(out))["seconds_to_result"].isna().all())
    engine = make_engine(url)
    with Session(engine) as session:
        campaign = session.scalar(select(Campaign).where(Campaign.name == "shallue/mnist/simple_cnn"))
        assert (campaign.target_metric, campaign.target_threshold, campaign.eval_every) == ("val_error", 0.01, 100)
        assert campaign.spec["eval_intervals"]["100"] >= 3
        trial = session.scalar(select(Trial).join(Cell).where(
            Cell.campaign_id == campaign.id, Cell.batch_size == 64,
            Cell.optimizer == "nesterov_momentum", Trial.trial_number == 1))
        assert (trial.optuna_trial_id, trial.outcome, trial.steps_to_result) == (-1, "reached", 300)
        assert trial.config["status"] == "COMPLETE" and trial.hparams == LR(1)
        row = session.scalar(select(Measurement).where(Measurement.trial_id == trial.id,
                                                       Measurement.step == 300))
        assert (row.examples, row.val_error, row.train_loss) == (300 * 64, 0.009, 1.0)
        assert row.extra == {"test_classification_error": 0.5}
    # The open_images goal is maximised and lives in the extra JSON.
    table = results(capsys, url, "shallue/open_images/resnet_50")
    assert table.loc[("momentum", 1024), "steps_to_result"] == 200
    # A sub-folder group keeps its path (it has no Figure-1 goal: given here); neither
    # trial beats 0.2 there.
    code, out, _ = run(capsys, "import-shallue", str(archive[0]), "--prefix", "imagenet_subsets/",
                       "--target-metric", "val_error", "--threshold", "0.2", "--storage", url)
    assert code == 0 and "shallue/imagenet_subsets/imagenet_half_classes/resnet_50" in out
    table = results(capsys, url, "shallue/imagenet_subsets/imagenet_half_classes/resnet_50")
    assert table["steps_to_result"].isna().all() and table["trials"].tolist() == [2]


def test_tar_import_is_the_folder_import_and_idempotent(archive, tmp_path, capsys):
    folder_url, tar_url = f"sqlite:///{tmp_path / 'f.db'}", f"sqlite:///{tmp_path / 't.db'}"
    assert run(capsys, "import-shallue", str(archive[0]), "--storage", folder_url)[0] == 0
    code, out, _ = run(capsys, "import-shallue", str(archive[1]), "--storage", tar_url)
    assert code == 0 and "100% of the archive read" in out
    assert counts(folder_url) == counts(tar_url) == (2, 4, 10, 18)
    pd.testing.assert_frame_equal(results(capsys, folder_url, "shallue/mnist/simple_cnn"),
                                  results(capsys, tar_url, "shallue/mnist/simple_cnn"))
    code, out, _ = run(capsys, "import-shallue", str(archive[1]), "--storage", tar_url)
    assert code == 0 and "0 new cells (4 already there)" in out
    assert counts(tar_url) == (2, 4, 10, 18)


def test_first_n_trials_by_integer_id_through_results(archive, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'n.db'}"
    code, _, _ = run(capsys, "import-shallue", str(archive[0]), "--first-n-trials", "2",
                     "--prefix", "mnist/", "--storage", url)
    assert code == 0
    table = results(capsys, url, "shallue/mnist/simple_cnn")
    # First 2 COMPLETE trials by integer id: 1 and 3 (not 1 and 10); INFEASIBLE 2 lies between.
    assert table.loc[("nesterov_momentum", 64), "steps_to_result"] == 200
    assert table.loc[("nesterov_momentum", 64), "winner_trial"] == 3
    assert table.loc[("nesterov_momentum", 64), "trials"] == 3
    assert table.loc[("nesterov_momentum", 128), "steps_to_result"] == 100
    # Other options on the same campaign are refused with one line, exit 2.
    code, _, err = run(capsys, "import-shallue", str(archive[0]), "--first-n-trials", "3",
                       "--prefix", "mnist/", "--storage", url)
    assert code == 2 and err.startswith("error: campaign 'shallue/mnist/simple_cnn' already exists")
    assert len(err.strip().splitlines()) == 1


def test_target_override_imports_a_workload_without_a_goal(archive, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'o.db'}"
    code, out, _ = run(capsys, "import-shallue", str(archive[0]), "--prefix", "unknown_set/",
                       "--target-metric", "val_error", "--threshold", "0.2", "--storage", url)
    assert code == 0 and "shallue/unknown_set/tiny_net" in out
    assert results(capsys, url, "shallue/unknown_set/tiny_net")["steps_to_result"].tolist() == [5]


def test_bad_paths_are_one_line_user_errors(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'e.db'}"
    code, _, err = run(capsys, "import-shallue", str(tmp_path / "missing.tar.bz2"), "--storage", url)
    assert code == 2 and "no such file or folder" in err
    junk = tmp_path / "junk.tar.bz2"
    junk.write_bytes(b"not an archive at all")
    code, _, err = run(capsys, "import-shallue", str(junk), "--storage", url)
    assert code == 2 and "not a readable tar archive" in err and len(err.strip().splitlines()) == 1


def test_a_source_without_studies_is_a_one_line_error_and_writes_nothing(archive, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.txt").write_text("no study here")
    database = tmp_path / "none.db"
    url = f"sqlite:///{database}"
    code, out, err = run(capsys, "import-shallue", str(empty), "--storage", url)
    assert code == 2 and err.strip().splitlines() == [
        f"error: {empty}: no published studies found (folders dataset/model/optimizer/batch_size "
        f"holding study.json); nothing imported"]
    assert "imported" not in out  # no "0 cells imported" beside the error
    code, out, err = run(capsys, "import-shallue", str(archive[1]), "--prefix", "cifar_10/",
                         "--storage", url)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "imported" not in out
    assert "no published studies found under --prefix cifar_10/" in err
    assert not database.exists()  # not even an empty schema


def test_worker_on_an_imported_campaign_is_one_line_exit_2(archive, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    assert run(capsys, "import-shallue", str(archive[0]), "--storage", url)[0] == 0
    code, _, err = run(capsys, "worker", "--campaign", "shallue/mnist/simple_cnn", "--storage", url)
    assert code == 2
    assert err.strip() == ("error: campaign 'shallue/mnist/simple_cnn' holds imported published "
                           "data; it has no trials to run (use results, analyze or the dashboard)")


def test_figures_of_imported_campaigns_say_the_evaluation_interval_varies(archive, tmp_path, capsys):
    """mnist/simple_cnn is evaluated every 100 steps at B=64 and every 50 or 100 at
    B=128: figures must say the interval varies instead of only 'evaluated every 100
    steps' (the dashboard's context: tests/app/test_figures_export.py). open_images
    (every 100) has one interval and says nothing more."""
    from study import figures
    from study.results import campaign_info
    url = f"sqlite:///{tmp_path / 'a.db'}"
    assert run(capsys, "import-shallue", str(archive[0]), "--storage", url)[0] == 0
    engine = make_engine(url)
    varying = campaign_info(engine, "shallue/mnist/simple_cnn")
    constant = campaign_info(engine, "shallue/open_images/resnet_50")
    assert varying.eval_interval_varies and not constant.eval_interval_varies
    line = figures.FigureContext(varying.figure_workload, varying.target_text,
                                 varying.eval_every).line()
    assert "evaluation interval varies" in line and "every 100 steps" in line
    assert constant.figure_workload == "open_images/resnet_50"
    svg = tmp_path / "steps.svg"
    assert run(capsys, "figure", "--campaign", "shallue/mnist/simple_cnn", "--output",
               str(svg), "--storage", url)[0] == 0
    assert "evaluation interval varies" in svg.read_text()


def test_an_infinite_value_never_beats_the_goal(tmp_path, capsys):
    """inf is stored as NULL, which never beats a goal in SQL: the importer's own
    steps-to-result must not count it either (here maximising, where inf > goal)."""
    root = tmp_path / "data"
    ap = pd.DataFrame({"step": [100, 200], "val/average_precision": [float("inf"), 0.35],
                       "train/cross_entropy_error": [2.0, 1.0]})
    write_study(root, "open_images/resnet_50", "momentum", 1024, {3: ("COMPLETE", ap, LR(3))})
    url = f"sqlite:///{tmp_path / 'inf.db'}"
    assert run(capsys, "import-shallue", str(root), "--storage", url)[0] == 0
    with Session(make_engine(url)) as session:
        trial = session.scalars(select(Trial)).one()
        assert (trial.steps_to_result, trial.best_metric) == (200, 0.35)
    assert results(capsys, url, "shallue/open_images/resnet_50")["steps_to_result"].tolist() == [200]
    read = read_shallue(root, goal=Goal("val_average_precision", 0.31, "max"))
    assert read.trials["steps_to_result"].tolist() == [200]
