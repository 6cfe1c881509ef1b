"""Campaign-level rules applied when a trial's config is resolved, and the ready
campaigns of the papers checked against the update counts of methods.md section 7."""
import math
from pathlib import Path

import pytest

from study.resolve import resolve_trial_config
from study.spec import load_spec
from trainers.batch_schedules import BatchSizePlan, count_updates

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def resolve(spec, batch_size, schedule=None, hparams=None):
    optimizer = spec.optimizers[0]
    schedule = schedule or spec.schedules[0]
    space = {p.name: p.value for p in spec.cell_space(optimizer, schedule)}
    return resolve_trial_config(spec, batch_size=batch_size, optimizer=optimizer, schedule=schedule,
                                hparams=hparams or space, seed=0, device="cpu")


@pytest.mark.parametrize("path", sorted(EXAMPLES.rglob("*.toml")), ids=lambda p: p.stem)
def test_every_example_campaign_is_valid(path):
    spec = load_spec(path)
    for batch_size, optimizer, schedule in spec.cells():
        space = spec.cell_space(optimizer, schedule)
        hparams = {p.name: p.value if p.is_fixed else (p.low if p.low is not None else p.choices[0])
                   for p in space}
        config = resolve_trial_config(spec, batch_size=batch_size, optimizer=optimizer,
                                      schedule=schedule, hparams=hparams, seed=0, device="cpu")
        assert config.batch_size == batch_size


def test_square_root_rule_and_regime_adaptation():
    spec = load_spec(EXAMPLES / "hoffer2017_f1_mnist" / "sqrt_lr_gbn_ra.toml")
    small, large = resolve(spec, 128), resolve(spec, 4096)
    assert small.hparams["learning_rate"] == pytest.approx(0.1)
    assert large.hparams["learning_rate"] == pytest.approx(0.1 * math.sqrt(32))  # x 5.657
    assert large.hparams["base_learning_rate"] == 0.1
    assert (small.max_epochs, large.max_epochs) == (40, 40 * 32)
    assert large.hparams["milestones"] == "640,960"
    assert large.hparams["ghost_batch_size"] == 128


def test_baseline_keeps_the_learning_rate():
    spec = load_spec(EXAMPLES / "hoffer2017_f1_mnist" / "baseline.toml")
    assert resolve(spec, 4096).hparams["learning_rate"] == 0.1
    assert resolve(spec, 4096).max_epochs == 40


@pytest.mark.parametrize("variant,updates", [
    ("original", 78_200), ("increasing_batch", 29_240),
    ("increased_lr", 6_500), ("increased_momentum", 2_360)])
def test_smith_effective_lr_campaigns_take_the_papers_update_counts(variant, updates):
    """CIFAR-10 (N = 50,000), 200 epochs, ceil(N / B) updates per epoch."""
    spec = load_spec(EXAMPLES / "smith2017_effective_lr" / f"{variant}.toml")
    config = resolve(spec, spec.batch_sizes[0])
    plan = BatchSizePlan(config.batch_size, **config.batch_plan)
    assert count_updates(plan, 50_000, config.max_epochs) == (updates, 50_000 * 200)


def test_smith_wrn_modes_share_the_noise_scale_every_epoch():
    spec = load_spec(EXAMPLES / "smith2017_wrn_cifar10.toml")
    plans = [BatchSizePlan(128, **resolve(spec, 128, schedule).batch_plan) for schedule in spec.schedules]
    for epoch in range(200):
        ratios = {plan.lr_factor(epoch) / plan.batch_size(epoch) for plan in plans}
        assert max(ratios) == pytest.approx(min(ratios))
    # hybrid: 60 epochs x ceil(50000/128) + 140 x ceil(50000/640) = 23,460 + 11,060
    assert [count_updates(p, 50_000, 200)[0] for p in plans] == [78_200, 34_520, 29_000]


def test_loader_workers_is_a_campaign_setting_stored_with_the_trial():
    from study.spec import SpecError, parse_spec
    from trainers.vectorized import is_vectorizable
    text = (EXAMPLES / "demo_digits.toml").read_text()
    default = resolve(parse_spec(text, "demo"), 16)
    assert default.loader_workers == 8 and default.to_json_dict()["loader_workers"] == 8
    two = resolve(parse_spec(text.replace("[campaign]\n", "[campaign]\nloader_workers = 2\n", 1), "demo"), 16)
    assert two.loader_workers == 2 and two.to_json_dict()["loader_workers"] == 2
    assert is_vectorizable(default) and is_vectorizable(two)  # resident data: no effect, still stacked
    with pytest.raises(SpecError, match="campaign.loader_workers"):
        parse_spec(text.replace("[campaign]\n", "[campaign]\nloader_workers = -1\n", 1), "demo")


def test_the_stored_config_names_every_default_it_trains_with():
    """lars trains with its registry momentum 0.9, and a warm-up schedule with its 5
    epochs, when the campaign leaves them out: the resolved (stored) config says so
    (analysis reads the momentum); regime adaptation stretches the default warm-up as it
    stretches a given one; a value the campaign gives wins."""
    from study.spec import parse_spec
    from tests.study.conftest import TINY_SPEC
    text = (TINY_SPEC.replace('optimizers = ["momentum"]', 'optimizers = ["lars"]')
            .replace('schedules = ["constant"]', 'schedules = ["warmup_constant"]')
            .replace("[search_space.optimizer.momentum]", "[search_space.optimizer.lars]")
            .replace('momentum = { low = 0.8, high = 0.95, scale = "reverse_log" }\n', ""))
    spec = parse_spec(text, "defaults.toml")
    config = resolve(spec, 16, hparams={"learning_rate": 0.1})
    assert (config.hparams["momentum"], config.hparams["warmup_epochs"]) == (0.9, 5)
    assert resolve(spec, 16, hparams={"learning_rate": 0.1, "warmup_epochs": 2}).hparams["warmup_epochs"] == 2
    adapted = parse_spec(text + "\n[scaling]\nrule = \"linear\"\nbase_batch_size = 16\n"
                                "regime_adaptation = true\n", "adapted.toml")
    assert resolve(adapted, 64, hparams={"learning_rate": 0.1}).hparams["warmup_epochs"] == 5 * 4
