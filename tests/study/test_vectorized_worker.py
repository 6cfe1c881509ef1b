"""A worker that trains K trials of a cell together stores what one-at-a-time stores."""
import textwrap

import pandas as pd
import pytest

from db import queries
from db.engine import make_engine
from study.campaigns import create_campaign
from study.results import campaign_info
from study.spec import parse_spec
from study.worker import CampaignWorker

pytestmark = pytest.mark.slow

SPEC = textwrap.dedent("""
    [campaign]
    name = "vec"
    workload = "digits_mlp"
    batch_sizes = [32, 128]
    optimizers = ["momentum"]
    schedules = ["constant"]
    trials_per_cell = 4
    max_steps = 120
    eval_every = 10

    [target]
    metric = "val_error"
    threshold = 0.08

    [search_space.optimizer.momentum]
    learning_rate = { low = 0.003, high = 3.0, scale = "log" }
    momentum = { low = 0.5, high = 0.99, scale = "reverse_log" }
""")


def run_campaign(tmp_path, name: str, trials_at_once: int, **options) -> pd.DataFrame:
    url = f"sqlite:///{tmp_path / name}.db"
    engine = make_engine(url)
    create_campaign(engine, url, parse_spec(SPEC, "vec.toml"))
    worker = CampaignWorker(engine, url, "vec", device="cpu", log=lambda line: None,
                            trials_at_once=trials_at_once, **options)
    assert worker.run() == 8
    info = campaign_info(engine, "vec")
    trials = queries.trials(engine, info.id)
    assert trials.groupby("cell_id").size().tolist() == [4, 4]
    assert (trials["worker_id"] == worker.worker_id).all()
    ms = queries.measurements(engine, info.id).merge(
        trials[["trial_id", "trial_number", "outcome", "steps_to_result"]], on="trial_id")
    return ms.sort_values(["batch_size", "trial_number", "step"]).reset_index(drop=True)


def test_vectorized_worker_equals_sequential_worker(tmp_path):
    """With pruning on, which trials get pruned depends on the order results arrive (in
    lockstep here, one after another there), but the cell's steps-to-result cannot: a
    trial is pruned only at or after a step some other trial already reached at. The
    measurements both runs recorded agree."""
    sequential = run_campaign(tmp_path, "seq", 1)
    vectorized = run_campaign(tmp_path, "vec", 4)
    keys = ["batch_size", "trial_number", "step"]
    both = sequential.merge(vectorized, on=keys, suffixes=("_seq", "_vec"))
    # Unstable trials (too high a learning rate) are chaotic: float32 reductions in
    # another order part them fast. Compare the ones that are learning.
    both = both.loc[(both["train_loss_seq"] < 1.0) & (both["outcome_seq"] != "diverged")]
    assert len(both) >= 4
    # float32 reductions in another order; chaotic high-lr trials amplify the difference
    for column in ("train_loss", "val_loss"):
        assert both[f"{column}_vec"].to_numpy() == pytest.approx(both[f"{column}_seq"].to_numpy(), rel=1e-3)
    assert (both["examples_seq"] == both["examples_vec"]).all()
    best = lambda frame: frame.groupby("batch_size")["steps_to_result"].min().to_dict()
    assert best(vectorized) == best(sequential)
    assert any(v == v for v in best(sequential).values())  # some cell reached the target


def test_auto_on_cpu_trains_one_at_a_time_exactly_as_one(tmp_path):
    """`--trials-at-once auto` (the command line's default) stacks nothing on CPU: every
    trial's measurements are bit for bit those of a one-at-a-time worker."""
    one = run_campaign(tmp_path, "one", 1)
    auto = run_campaign(tmp_path, "auto", "auto")
    columns = ["batch_size", "trial_number", "step", "examples", "train_loss", "val_loss", "val_error",
               "outcome", "steps_to_result"]
    pd.testing.assert_frame_equal(auto[columns], one[columns])


def test_auto_on_cuda_claims_each_cells_own_k(tmp_path, monkeypatch):
    """On CUDA, AUTO sizes every cell once from trainers.vectorized.auto_k (given the
    cell's resolved config) and claims that many of its slots at a time."""
    import torch

    import trainers.vectorized
    url = f"sqlite:///{tmp_path / 'auto.db'}"
    engine = make_engine(url)
    create_campaign(engine, url, parse_spec(SPEC, "vec.toml"))
    lines = []
    worker = CampaignWorker(engine, url, "vec", device="cpu", log=lines.append, trials_at_once="auto")
    assert worker._trials_at_once_per_cell() == {} and worker._room() == 1  # CPU: one at a time
    probes = []
    monkeypatch.setattr(trainers.vectorized, "auto_k",
                        lambda config, cache: probes.append(config) or {32: 3, 128: 1}[config.batch_size])
    worker.device = torch.device("cuda")
    worker._cell_k = worker._trials_at_once_per_cell()
    assert sorted(worker._cell_k.values()) == [1, 3]
    assert sorted((c.batch_size, c.optimizer, c.device) for c in probes) == [(32, "momentum", "cuda"),
                                                                              (128, "momentum", "cuda")]
    assert "trials at once (auto" in lines[-1] and "B=32 momentum 3" in lines[-1]
    assert worker._room() == 3
    sizes = []
    while (group := worker._claim_group(worker._room())) is not None:
        sizes.append((group.claims[0].batch_size, len(group.claims)))
    # Always the cell with the fewest slots taken (ties: the first cell), at most its K,
    # at most the slots it has left: B = 32 gets 3 of its 4, then its last one.
    assert sizes == [(32, 3), (128, 1), (128, 1), (128, 1), (32, 1), (128, 1)]


def test_trials_at_once_is_a_number_or_auto():
    with pytest.raises(ValueError, match="trials_at_once"):
        CampaignWorker(None, "", "vec", trials_at_once=0)
    from study.cli import _trials_at_once
    assert _trials_at_once("auto") == "auto" and _trials_at_once("8") == 8
    for bad in ("0", "-2", "many"):
        with pytest.raises(Exception, match="must be 'auto' or a number"):
            _trials_at_once(bad)


def test_an_auto_sized_group_trains_as_one_stack(tmp_path, monkeypatch):
    """A group AUTO sized from memory at start is not re-split by choose_k while training
    (that would compile a stack size for the remainder)."""
    import trainers.vectorized
    monkeypatch.setattr(CampaignWorker, "_trials_at_once_per_cell",
                        lambda self: {cell_id: 4 for cell_id in (1, 2)})  # the fresh database's two cells
    chunks, real = [], trainers.vectorized.run_trials_vectorized
    monkeypatch.setattr(trainers.vectorized, "run_trials_vectorized",
                        lambda configs, **kw: chunks.append((len(configs), kw["chunk_size"])) or real(configs, **kw))
    run_campaign(tmp_path, "auto", "auto")
    assert chunks == [(4, 4), (4, 4)]


@pytest.mark.parametrize("mode, compile", [("auto", None), ("never", False)])
def test_the_workers_compile_mode_reaches_the_trainer(tmp_path, monkeypatch, mode, compile):
    """--compile auto | always | never is run_trials_vectorized's compile= (None: tiered on
    CUDA); `batchlab run` hands it to its workers. ("always" would compile on this CPU.)"""
    import trainers.vectorized
    from study.cli import COMPILE_MODES, build_parser
    args = build_parser().parse_args(["worker", "--campaign", "vec", "--compile", mode])
    assert COMPILE_MODES[args.compile] is compile and COMPILE_MODES["always"] is True
    assert build_parser().parse_args(["worker", "--campaign", "vec"]).compile == "auto"
    seen, real = [], trainers.vectorized.run_trials_vectorized
    monkeypatch.setattr(trainers.vectorized, "run_trials_vectorized",
                        lambda configs, **kw: seen.append(kw["compile"]) or real(configs, **kw))
    run_campaign(tmp_path, mode, 4, compile=COMPILE_MODES[args.compile])
    assert seen and set(seen) == {compile}
