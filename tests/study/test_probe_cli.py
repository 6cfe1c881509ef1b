"""Probe and checkpoint options in campaign specs, and `batchlab probe sharpness|hessian|
interpolate` on a tiny campaign whose workers saved their winners' weights."""
import textwrap

import pytest
import torch
import torch.nn.functional as F

from db import queries
from db.engine import make_engine
from study import worker as worker_module
from study.campaigns import create_campaign
from study.cli import main
from study.resolve import resolve_trial_config, with_checkpoint
from study.results import campaign_info
from study.spec import SpecError, parse_spec

SPEC = textwrap.dedent("""
    [campaign]
    name = "probed"
    workload = "digits_mlp"
    batch_sizes = [16, 256]
    optimizers = ["adam"]
    schedules = ["constant"]
    trials_per_cell = 1
    max_steps = 400
    eval_every = 10
    probes = ["distance", "norms", "noise_scale"]
    noise_scale_batches = 4
    checkpoints = "winners"
    checkpoint_dir = "CHECKPOINTS"

    [target]
    metric = "val_error"
    threshold = 0.1

    [search_space.optimizer.adam]
    learning_rate = 0.003
""")


def spec_text(tmp_path, **replace) -> str:
    text = SPEC.replace("CHECKPOINTS", str(tmp_path / "ckpt"))
    for old, new in replace.items():
        text = text.replace(old, new)
    return text


def test_spec_probe_options_reach_the_trial_config(tmp_path):
    spec = parse_spec(spec_text(tmp_path))
    assert spec.probes == ("distance", "norms", "noise_scale") and spec.noise_scale_batches == 4
    config = resolve_trial_config(spec, batch_size=16, optimizer="adam", schedule="constant",
                                  hparams={"learning_rate": 0.003}, seed=1, device="cpu")
    assert config.probes == spec.probes and config.noise_scale_batches == 4
    assert config.checkpoint_path is None  # the worker adds it, with the trial row id
    saved = with_checkpoint(spec, config, 7)
    assert saved.checkpoint_path == str(tmp_path / "ckpt" / "probed" / "trial_7.pt")
    assert saved.checkpoint_reached_only and saved.checkpoint_max_bytes == 1_000_000_000
    none = parse_spec(spec_text(tmp_path, **{'checkpoints = "winners"': 'checkpoints = "none"'}))
    assert with_checkpoint(none, config, 7) is config
    every = parse_spec(spec_text(tmp_path, **{'checkpoints = "winners"': 'checkpoints = "all"'}))
    assert not with_checkpoint(every, config, 7).checkpoint_reached_only


@pytest.mark.parametrize("old, new, field", [
    ('probes = ["distance", "norms", "noise_scale"]', 'probes = ["hessian"]', "campaign.probes"),
    ('probes = ["distance", "norms", "noise_scale"]', 'probes = ["norms", "norms"]', "campaign.probes"),
    ("noise_scale_batches = 4", "noise_scale_batches = 1", "campaign.noise_scale_batches"),
    ('checkpoints = "winners"', 'checkpoints = "best"', "campaign.checkpoints"),
])
def test_bad_probe_options_name_the_field(tmp_path, old, new, field):
    with pytest.raises(SpecError, match=field):
        parse_spec(spec_text(tmp_path, **{old: new}))


def test_default_options_keep_old_spec_json_unchanged(tmp_path):
    """A spec without the new fields serialises as before (campaign create stays idempotent)."""
    plain = "\n".join(line for line in spec_text(tmp_path).splitlines()
                      if not line.startswith(("probes", "noise_scale", "checkpoint")))
    keys = parse_spec(plain).to_json().keys()
    assert not {"probes", "noise_scale_batches", "checkpoints", "checkpoint_dir"} & set(keys)


@pytest.fixture
def campaign(tmp_path):
    url = f"sqlite:///{tmp_path / 'probe.db'}"
    engine = make_engine(url)
    create_campaign(engine, url, parse_spec(spec_text(tmp_path)))
    worker_module.CampaignWorker(engine, url, "probed", device="cpu", log=lambda line: None).run()
    return engine, url


def _mean_train_loss(engine, trial_id: int) -> float:
    """The training-set cross-entropy of a trial's saved weights, computed directly."""
    from study.probe_cli import load_winner_model, winners, training_batches
    info = campaign_info(engine, "probed")
    winner = next(w for w in winners(engine, info.id) if w.trial_id == trial_id)
    workload, model, config = load_winner_model(winner, torch.device("cpu"))
    (x, y), = training_batches(workload, config, torch.device("cpu"), batch_size=10_000)
    with torch.no_grad():
        return float(F.cross_entropy(model.eval()(x), y))


def test_probe_commands_store_results(campaign, capsys):
    engine, url = campaign
    info = campaign_info(engine, "probed")
    trials = queries.trial_checkpoints(engine, info.id)
    assert (trials["outcome"] == "reached").all() and trials["checkpoint_path"].notna().all()
    extra = queries.measurements(engine, info.id)["extra"].iloc[-1]
    assert {"distance_from_init", "grad_norm", "gns_b_simple"} <= set(extra)

    assert main(["probe", "sharpness", "--campaign", "probed", "--storage", url, "--epsilon", "1e-3",
                 "--subspace", "10"]) == 0
    assert main(["probe", "hessian", "--campaign", "probed", "--storage", url, "--max-iter", "30"]) == 0
    assert main(["probe", "interpolate", "--campaign", "probed", "--storage", url, "--alphas", "4",
                 "--batch-norm", "interpolate_running"]) == 0
    printed = capsys.readouterr().out
    assert "sharpness" in printed and "top_eigenvalue" in printed and "train_loss" in printed

    sharp = queries.probe_results(engine, info.id, "sharpness")
    assert len(sharp) == 4 and sorted(sharp["batch_size"]) == [16, 16, 256, 256]
    for row in sharp.itertuples():
        assert row.result["sharpness"] >= 0 and row.params["epsilon"] == 1e-3
        assert row.result["loss"] == pytest.approx(_mean_train_loss(engine, row.trial_id), rel=1e-4)
    hessian = queries.probe_results(engine, info.id, "hessian")
    assert len(hessian) == 2 and all(r["top_eigenvalue"] > 0 for r in hessian["result"])

    (interpolation,) = queries.probe_results(engine, info.id, "interpolation").itertuples()
    small, large = interpolation.params["small_trial_id"], interpolation.params["large_trial_id"]
    assert (interpolation.params["small_batch_size"], interpolation.params["large_batch_size"]) == (16, 256)
    result = interpolation.result
    assert result["alphas"] == [-1.0, 0.0, 1.0, 2.0]
    # Endpoints: alpha 0 is the small-batch model, alpha 1 the large-batch one.
    assert result["train_loss"][1] == pytest.approx(_mean_train_loss(engine, small), rel=1e-5)
    assert result["train_loss"][2] == pytest.approx(_mean_train_loss(engine, large), rel=1e-5)
    assert all(0 <= a <= 1 for a in result["test_accuracy"])


def test_probe_without_checkpoints_is_a_user_error(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'none.db'}"
    engine = make_engine(url)
    text = spec_text(tmp_path, **{'checkpoints = "winners"': 'checkpoints = "none"'})
    create_campaign(engine, url, parse_spec(text))
    worker_module.CampaignWorker(engine, url, "probed", device="cpu", log=lambda line: None).run()
    assert main(["probe", "hessian", "--campaign", "probed", "--storage", url]) == 2
    captured = capsys.readouterr()
    assert "no checkpoint" in captured.out and "no cell winner with a checkpoint" in captured.err
