"""Campaign creation: cells, one study per cell with its quasi-random points, idempotent."""
import optuna
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.engine import make_engine
from db.models import Campaign, Cell
from study.campaigns import CampaignConflict, create_campaign, study_name
from study.spec import load_spec, parse_spec
from study.tuning import distributions, optuna_storage, quasi_random_points
from tests.study.conftest import TINY_SPEC


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
