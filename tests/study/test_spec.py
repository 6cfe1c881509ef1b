"""Spec validation: each bad spec gives one line naming the file and the field, exit
status 2, and leaves the database untouched."""
import hashlib
from pathlib import Path

import pytest

from study.spec import SpecError, load_spec, parse_spec
from tests.study.conftest import TINY_SPEC, batchlab


def mutate(old: str, new: str) -> str:
    assert old in TINY_SPEC, old
    return TINY_SPEC.replace(old, new)


BAD_SPECS = [
    # (spec text, field named in the message, words in the message)
    ("[campaign\nname = 1", "<toml>", "not valid TOML"),
    (mutate('name = "tiny"', 'name = "has space"'), "campaign.name", "letters, digits"),
    (mutate('workload = "digits_mlp"', 'workload = "nope"'), "campaign.workload", "unknown workload"),
    (mutate("batch_sizes = [16, 64]", "batch_sizes = []"), "campaign.batch_sizes", "must not be empty"),
    (mutate("batch_sizes = [16, 64]", "batch_sizes = [16, -4]"), "campaign.batch_sizes", "positive"),
    (mutate("batch_sizes = [16, 64]", "batch_sizes = [16, 16]"), "campaign.batch_sizes", "duplicates"),
    (mutate('optimizers = ["momentum"]', 'optimizers = ["rmsprop"]'), "campaign.optimizers", "unknown optimizer"),
    (mutate('schedules = ["constant"]', 'schedules = ["wobbly"]'), "campaign.schedules", "unknown schedule"),
    (mutate("trials_per_cell = 3", "trials_per_cell = 0"), "campaign.trials_per_cell", "> 0"),
    (mutate("trials_per_cell = 3", 'trials_per_cell = "3"'), "campaign.trials_per_cell", "an integer"),
    (mutate("max_steps = 300", ""), "campaign.max_steps", "required"),
    (mutate("eval_every = 10", "eval_every = 1000"), "campaign.eval_every", "<= max_steps"),
    (mutate("seed = 0", "sede = 0"), "campaign.sede", "unknown field"),
    (mutate('metric = "val_error"', 'metric = "bleu"'), "target.metric", "unknown metric"),
    (mutate("threshold = 0.1", "threshold = nan"), "target.threshold", "finite"),
    (mutate('low = 0.01, high = 1.0, scale = "log"', 'low = 1.0, high = 0.01, scale = "log"'),
     "search_space.optimizer.momentum.learning_rate.low", "must be < high"),
    (mutate('low = 0.01, high = 1.0, scale = "log"', 'low = 0.0, high = 1.0, scale = "log"'),
     "search_space.optimizer.momentum.learning_rate.low", "> 0 on a log scale"),
    (mutate('low = 0.8, high = 0.95, scale = "reverse_log"', 'low = 0.8, high = 1.0, scale = "reverse_log"'),
     "search_space.optimizer.momentum.momentum.high", "< 1"),
    (mutate('scale = "reverse_log"', 'scale = "cubic"'),
     "search_space.optimizer.momentum.momentum.scale", "must be one of"),
    (mutate('momentum = { low = 0.8, high = 0.95, scale = "reverse_log" }', ""),
     "search_space.optimizer.momentum.momentum", "is required"),
    (mutate("[search_space.optimizer.momentum]", "[search_space.optimizer.sgd]"),
     "search_space.optimizer.sgd", "not in campaign.optimizers"),
    (TINY_SPEC + "\nbeta9 = 0.5\n", "search_space", "'beta9' is not a hyperparameter"),
    (mutate("[target]", "[targets]"), "targets", "unknown table"),
    (mutate('schedules = ["constant"]', 'schedules = ["grow"]') +
     '[schedule.grow]\nbatch = { mode = "explode", factor = 2, milestones = [1] }\n',
     "schedule.grow.batch", "unknown batch-size mode"),
    (mutate('schedules = ["constant"]', 'schedules = ["grow"]') +
     '[schedule.grow]\nlr_schedule = "zigzag"\n', "schedule.grow.lr_schedule", "unknown schedule"),
    (mutate('schedules = ["constant"]', 'schedules = ["grow"]') +  # a plan starts at each batch size
     '[schedule.grow]\nbatch = { mode = "increase_batch", factor = 2, milestones = [1], max_batch_size = 32 }\n',
     "schedule.grow.batch", "at batch size 64: max_batch_size 32 is below"),
    (TINY_SPEC + '[scaling]\nrule = "cubic"\nbase_batch_size = 128\n', "scaling.rule", "linear, sqrt"),
]


@pytest.mark.parametrize("text,field_name,words", BAD_SPECS)
def test_bad_spec_names_file_and_field(text, field_name, words):
    with pytest.raises(SpecError) as error:
        parse_spec(text, "bad.toml")
    message = str(error.value)
    assert message.startswith(f"bad.toml: {field_name}: "), message
    assert words in message
    assert "\n" not in message


def test_valid_spec_is_frozen_and_typed(tiny_spec):
    spec = load_spec(tiny_spec)
    assert spec.batch_sizes == (16, 64) and spec.trials_per_cell == 3
    assert str(spec.target) == "val_error < 0.1"
    assert [p.name for p in spec.cell_space("momentum", "constant")] == ["learning_rate", "momentum"]
    with pytest.raises(AttributeError):
        spec.max_steps = 5  # frozen


def test_named_schedule_with_a_batch_plan():
    text = TINY_SPEC.replace('schedules = ["constant"]', 'schedules = ["grow"]') + (
        '[schedule.grow]\nlr_schedule = "constant"\n'
        'batch = { mode = "increase_batch", factor = 2, milestones = [1, 2] }\n')
    spec = parse_spec(text, "grow.toml")
    assert spec.schedule_def("grow").lr_schedule == "constant"
    assert dict(spec.schedule_def("grow").batch_plan) == {
        "mode": "increase_batch", "factor": 2, "milestones": [1, 2]}
    assert spec.schedule_def("constant").batch_plan is None


def test_missing_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="cannot be read"):
        load_spec(tmp_path / "absent.toml")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


@pytest.mark.parametrize("index", [0, 6, 15, 19])
def test_cli_exit_2_one_line_and_database_untouched(tmp_path, tiny_spec, sqlite_url, index):
    database = Path(sqlite_url.removeprefix("sqlite:///"))
    created = batchlab("campaign", "create", str(tiny_spec), "--storage", sqlite_url)
    assert created.returncode == 0, created.stderr
    before = digest(database)
    text, field_name, _ = BAD_SPECS[index]
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace('name = "tiny"', 'name = "other"'))
    result = batchlab("campaign", "create", str(bad), "--storage", sqlite_url)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: ")
    assert digest(database) == before


def test_bad_spec_on_a_fresh_storage_creates_no_database(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD_SPECS[2][0])
    database = tmp_path / "never.db"
    result = batchlab("campaign", "create", str(bad), "--storage", f"sqlite:///{database}")
    assert result.returncode == 2 and not database.exists()


def test_readme_campaign_file_is_a_valid_spec():
    """The campaign file README.md shows (its first toml block) is one users copy."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    text = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    spec = parse_spec(text, "README.md")
    assert (spec.name, spec.workload, spec.optimizers) == ("my_digits", "digits_mlp", ("sgd", "momentum"))
