"""Campaign creation: cells, one study per cell with its quasi-random points, idempotent."""
import optuna
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db import queries
from db.engine import make_engine
from db.models import Campaign, Cell
from study.campaigns import CampaignConflict, create_campaign, study_name
from study.spec import load_spec, parse_spec
from study.tuning import distributions, optuna_storage, quasi_random_points
from study.results import campaign_info
from tests.study.conftest import TINY_SPEC, batchlab
from tests.trainers.test_datasets import write_image_folder


def counts(engine, url):
    with Session(engine) as session:
        campaigns = session.scalar(select(func.count()).select_from(Campaign))
        cells = session.scalar(select(func.count()).select_from(Cell))
    studies = optuna.get_all_study_summaries(optuna_storage(url))
    return campaigns, cells, sorted((s.study_name, s.n_trials) for s in studies)


def test_create_makes_cells_and_enqueues_points(tiny_spec, sqlite_url):
    engine, spec = make_engine(sqlite_url), load_spec(tiny_spec)
    result = create_campaign(engine, sqlite_url, spec)
    assert result.created and result.cells == 2
    campaigns, cells, studies = counts(engine, sqlite_url)
    assert (campaigns, cells) == (1, 2)
    assert studies == sorted([(study_name("tiny", b, "momentum", "constant"), 3) for b in (16, 64)])
    study = optuna.load_study(study_name=study_name("tiny", 16, "momentum", "constant"),
                              storage=optuna_storage(sqlite_url))
    waiting = [t.system_attrs["fixed_params"]
               for t in study.get_trials(states=(optuna.trial.TrialState.WAITING,))]
    expected = quasi_random_points(distributions(spec.cell_space("momentum", "constant")), 3, 0)
    assert waiting == expected
    assert len({tuple(sorted(p.items())) for p in waiting}) == 3  # no repeats


def test_create_is_idempotent(tiny_spec, sqlite_url):
    engine, spec = make_engine(sqlite_url), load_spec(tiny_spec)
    create_campaign(engine, sqlite_url, spec)
    before = counts(engine, sqlite_url)
    again = create_campaign(engine, sqlite_url, load_spec(tiny_spec))
    assert not again.created
    assert counts(engine, sqlite_url) == before


def test_same_name_different_spec_is_refused(tiny_spec, sqlite_url):
    engine = make_engine(sqlite_url)
    create_campaign(engine, sqlite_url, load_spec(tiny_spec))
    before = counts(engine, sqlite_url)
    changed = parse_spec(TINY_SPEC.replace("trials_per_cell = 3", "trials_per_cell = 4"), "x.toml")
    with pytest.raises(CampaignConflict, match="different spec"):
        create_campaign(engine, sqlite_url, changed)
    assert counts(engine, sqlite_url) == before


def test_interrupted_create_is_finished_by_running_it_again(tiny_spec, sqlite_url):
    """Studies made before a crash, but no campaign row: the next create completes them
    without enqueuing points twice."""
    spec = load_spec(tiny_spec)
    storage = optuna_storage(sqlite_url)
    half = optuna.create_study(study_name=study_name("tiny", 16, "momentum", "constant"),
                               storage=storage, direction="minimize")
    points = quasi_random_points(distributions(spec.cell_space("momentum", "constant")), 3, 0)
    half.enqueue_trial(points[0])
    engine = make_engine(sqlite_url)
    create_campaign(engine, sqlite_url, spec)
    _, _, studies = counts(engine, sqlite_url)
    assert [n for _, n in studies] == [3, 3]


IMAGENET_SPEC = """
[campaign]
name = "folders"
workload = "imagenet_resnet50"
batch_sizes = [4]
optimizers = ["momentum"]
schedules = ["constant"]
trials_per_cell = 1
max_steps = 2
eval_every = 1
data_dir = "DATA"
val_size = 3

[target]
metric = "val_error"
threshold = 0.01

[search_space.optimizer.momentum]
learning_rate = { low = 0.01, high = 0.1, scale = "log" }
momentum = { low = 0.8, high = 0.95, scale = "reverse_log" }
"""


def test_a_dataloader_workload_is_created_and_trained(tmp_path):
    """Full-size ImageNet streams JPEG folders through a DataLoader (no in-memory tensors):
    create checks its folders and the worker trains it (both used to ask for tensors)."""
    write_image_folder(tmp_path / "data", {"train": 4, "val": 2})  # 3 classes: 12 train, 6 val
    spec = tmp_path / "folders.toml"
    spec.write_text(IMAGENET_SPEC.replace("DATA", str(tmp_path / "data")))
    url = f"sqlite:///{tmp_path / 'folders.db'}"
    too_large = tmp_path / "large.toml"
    too_large.write_text(spec.read_text().replace("batch_sizes = [4]", "batch_sizes = [16]"))
    refused = batchlab("campaign", "create", str(too_large), "--storage", url)
    assert refused.returncode == 2
    assert "batch size 16 is larger than the training set of 'imagenet_resnet50' (9 examples)" in refused.stderr
    created = batchlab("campaign", "create", str(spec), "--storage", url)
    assert created.returncode == 0, created.stderr
    worked = batchlab("worker", "--campaign", "folders", "--storage", url, "--device", "cpu")
    assert worked.returncode == 0, worked.stderr
    engine = make_engine(url)
    trials = queries.trials(engine, campaign_info(engine, "folders").id)
    assert trials["outcome"].tolist() == ["not_reached"] and trials["steps"].tolist() == [2]
    measurements = queries.measurements(engine, campaign_info(engine, "folders").id)
    assert measurements["step"].tolist() == [1, 2]
    # 3 validation images: the error is a multiple of 1/3
    assert all(abs(e * 3 - round(e * 3)) < 1e-6 for e in measurements["val_error"])


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_concurrent_creates_make_one_campaign_and_queue_each_point_once(tiny_spec, tmp_path, request, backend):
    """`campaign create` run on several machines at once (each `batchlab run` does it):
    one campaign, every cell's points queued once, and every create returns it; on
    PostgreSQL also on a new database, where Optuna creates its tables."""
    from concurrent.futures import ThreadPoolExecutor
    url = (f"sqlite:///{tmp_path / 'race.db'}" if backend == "sqlite" else
           request.getfixturevalue("local_postgres").create_database(f"race_{tmp_path.name[-8:].lower()}"))
    spec = load_spec(tiny_spec)
    if backend == "sqlite":  # a new SQLite file is one machine's: not serialised (tuning._first_use_lock)
        optuna_storage(url)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: create_campaign(make_engine(url), url, spec), range(4)))
    assert len({r.campaign_id for r in results}) == 1 and sum(r.created for r in results) == 1
    campaigns, cells, studies = counts(make_engine(url), url)
    assert (campaigns, cells) == (1, 2) and [n for _, n in studies] == [3, 3]


@pytest.mark.parametrize("workload,ghost", [
    ("mnist10k_f1", '{ low = 2, high = 16, scale = "log", integer = true }'),  # 1-D batch norm, from 2
    ("mnist10k_f1", "{ choices = [2, 8] }"),
    ("digits_mlp", '{ low = 1, high = 16, scale = "log", integer = true }'),  # no batch norm at all
])
def test_a_searched_ghost_batch_size_that_cannot_be_1_is_accepted(tmp_path, workload, ghost):
    """The refusal of a ghost_batch_size range reaching 1 (test_bad_input) is for models whose
    batch norm sees one value per channel: a range from 2, or a model without batch norm,
    is created with its points."""
    from tests.shared_data import MNIST_T10K
    text = TINY_SPEC.replace('workload = "digits_mlp"', f'workload = "{workload}"\ndata_dir = "{MNIST_T10K}"')
    spec = parse_spec(text + f"\n[search_space.all]\nghost_batch_size = {ghost}\n")
    url = f"sqlite:///{tmp_path / 'ghost.db'}"
    assert create_campaign(make_engine(url), url, spec).cells == 2
    _, _, studies = counts(make_engine(url), url)
    assert [n for _, n in studies] == [3, 3]
