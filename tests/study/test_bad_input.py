"""The bad-input battery, through the real command line: each bad input ends the command
with one line on stderr, exit status 2, no traceback, no password, and leaves the
database byte-for-byte unchanged. (Per-field spec messages are in test_spec.py.)"""
from __future__ import annotations

import gzip
import hashlib
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from study.retry import DEFAULT_BACKOFF
from tests.study.conftest import TINY_SPEC, batchlab, batchlab_script

from tests.shared_data import MNIST_T10K
PASSWORD = "s3cret-Pa55"
HAS_CUDA = torch.cuda.is_available()
UNREACHABLE = f"postgresql+psycopg://nobody:{PASSWORD}@127.0.0.1:1/x"
MNIST_SPEC = TINY_SPEC.replace('workload = "digits_mlp"', 'workload = "mnist10k_mlp"\ndata_dir = "DATA"')
# Keskar's F1: batch norm over (B, 512) activations, one value per channel per example.
F1_SPEC = MNIST_SPEC.replace("mnist10k_mlp", "mnist10k_f1").replace("DATA", str(MNIST_T10K))


def mutate(old: str, new: str, base: str = TINY_SPEC) -> str:
    assert old in base, old
    return base.replace(old, new)


def other(text: str) -> str:
    """The same bad spec under a new name, so only the bad part can be what fails."""
    return text.replace('name = "tiny"', 'name = "other"')


# (case id, command, spec text or None, storage override or None, data setup, words in the line)
CASES = [
    ("toml_on_run", "run", "[campaign\nname = 1", None, None, "not valid TOML"),
    ("unknown_workload_on_run", "run", other(mutate('workload = "digits_mlp"', 'workload = "nope"')),
     None, None, "unknown workload 'nope'"),
    ("unknown_schedule", "create", other(mutate('schedules = ["constant"]', 'schedules = ["wobbly"]')),
     None, None, "campaign.schedules"),
    ("unknown_field", "create", other(mutate("seed = 0", "seed = 0\nbatchsize = 3")), None, None,
     "campaign.batchsize: unknown field"),
    ("negative_batch", "create", other(mutate("batch_sizes = [16, 64]", "batch_sizes = [-16]")),
     None, None, "campaign.batch_sizes"),
    ("zero_batch", "create", other(mutate("batch_sizes = [16, 64]", "batch_sizes = [0, 16]")),
     None, None, "campaign.batch_sizes"),
    ("batch_larger_than_train_set", "create",
     other(mutate("batch_sizes = [16, 64]", "batch_sizes = [16, 2048]")), None, None,
     "batch size 2048 is larger than the training set of 'digits_mlp' (1197 examples)"),
    ("batch_larger_than_train_set_on_run", "run",
     other(mutate("batch_sizes = [16, 64]", "batch_sizes = [4096]")), None, None, "1197 examples"),
    ("empty_choices", "create", other(mutate('momentum = { low = 0.8, high = 0.95, scale = "reverse_log" }',
                                             "momentum = { choices = [] }")), None, None, "non-empty list"),
    ("no_search_space", "create", other(TINY_SPEC.split("[search_space")[0]), None, None, "search_space"),
    ("batch_norm_on_one_example", "create",
     other(F1_SPEC.replace("batch_sizes = [16, 64]", "batch_sizes = [16, 19]")),  # 8,000 = 421 x 19 + 1
     None, None, "cell (batch size 19, momentum, constant): every trial would fail: batch-norm layer"),
    ("ghost_batch_size_1_on_1d_batch_norm", "create",
     other(F1_SPEC + "\n[search_space.all]\nghost_batch_size = 1\n"),
     None, None, "ghost_batch_size 1 normalizes each example on its own"),
    ("searched_ghost_batch_size_reaching_1", "create",
     other(F1_SPEC + "\n[search_space.all]\nghost_batch_size = { low = 1, high = 16, scale = \"log\", integer = true }\n"),
     None, None, "cell (batch size 16, momentum, constant): ghost_batch_size can be drawn as 1 (a range "
     "starting below 2, or 1 among its choices), and every trial that draws it would fail: batch-norm layer "
     "'net.2' (GhostBatchNorm1d)"),
    ("ghost_batch_size_choices_with_1", "create",
     other(F1_SPEC + "\n[search_space.all]\nghost_batch_size = { choices = [1, 8] }\n"),
     None, None, "ghost_batch_size can be drawn as 1"),
    ("val_size_larger_than_train_set", "create", other(mutate("seed = 0", "seed = 0\nval_size = 1497")),
     None, None, "the validation split takes 1497 examples from a training set of 1497"),
    ("zero_max_steps", "create", other(mutate("max_steps = 300", "max_steps = 0")), None, None,
     "campaign.max_steps"),
    ("negative_trials", "create", other(mutate("trials_per_cell = 3", "trials_per_cell = -1")), None, None,
     "campaign.trials_per_cell"),
    ("zero_eval_every", "create", other(mutate("eval_every = 10", "eval_every = 0")), None, None,
     "campaign.eval_every"),
    ("unreachable_storage", "create", other(TINY_SPEC),
     f"postgresql+psycopg://nobody:{PASSWORD}@127.0.0.1:1/x", None, "cannot connect to"),
    ("unreachable_storage_worker", "worker", None,
     f"postgresql+psycopg://nobody:{PASSWORD}@127.0.0.1:1/x", None, "cannot connect to"),
    ("malformed_storage_port", "create", other(TINY_SPEC),
     f"postgresql+psycopg://nobody:{PASSWORD}@host:notaport/x", None, "not a database URL"),
    ("malformed_storage_text", "create", other(TINY_SPEC), "no scheme here", None, "not a database URL"),
    ("unknown_storage_driver", "create", other(TINY_SPEC),
     f"postgresql+nodriver://nobody:{PASSWORD}@127.0.0.1/x", None, "driver"),
    ("missing_data_dir", "create", other(MNIST_SPEC), None, "missing", "file not found"),
    ("corrupt_data_file", "create", other(MNIST_SPEC), None, "corrupt", "md5 mismatch (expected content"),
    ("truncated_data_file", "create", other(MNIST_SPEC), None, "truncated", "md5 mismatch (expected content"),
    ("checksum_mismatch", "create", other(MNIST_SPEC), None, "checksum", "md5"),
    ("unknown_device_on_run", "run --device bogus", other(TINY_SPEC), None, None,
     "--device 'bogus': not a device"),
    ("absent_cuda_device_on_run", "run --device cuda:99", other(TINY_SPEC), None, None,
     "--device cuda:99"),  # checked before the campaign is created: nothing written
    ("zero_workers", "run --workers 0", other(TINY_SPEC), None, None, "--workers 0: must be at least 1"),
    ("same_name_other_spec", "create", mutate("max_steps = 300", "max_steps = 200"), None, None,
     "already exists with a different spec"),
]

# Commands outside the spec/storage pattern above, as argv lists run on the battery's
# database ("URL": its storage URL; "DIR": its folder). (case id, form, argv, words in the
# line), form "module" for `python -m study.cli` (torchrun's form) and "script" for the
# `batchlab` console script: both must print one line.
ARGV_CASES = [
    # user errors raised by the commands of study/cli_extra.py and study/probe_cli.py
    ("nqm_zero_batch_module", "module", ["nqm", "steps", "--batch-size", "0", "--lr", "1"],
     "--batch-size 0 must be > 0"),
    ("nqm_zero_batch_script", "script", ["nqm", "steps", "--batch-size", "0", "--lr", "1"],
     "--batch-size 0 must be > 0"),
    ("analyze_zero_resamples_module", "module",
     ["analyze", "--campaign", "tiny", "--output", "DIR/a", "--resamples", "0", "--storage", "URL"],
     "--resamples 0 must be >= 1"),
    ("import_zero_trials_module", "module",
     ["import-shallue", "DIR", "--first-n-trials", "0", "--storage", "URL"], "--first-n-trials 0"),
    ("import_missing_path_script", "script", ["import-shallue", "DIR/nowhere", "--storage", "URL"],
     "no such file or folder"),
    ("probe_no_winner_module", "module", ["probe", "sharpness", "--campaign", "tiny", "--storage", "URL"],
     "no cell winner with a checkpoint"),
    # a figure format batchlab does not write
    ("figure_pdf", "module", ["figure", "--campaign", "tiny", "--output", "DIR/out/f.pdf",
                              "--storage", "URL"], "f.pdf: must end in .png or .svg"),
    ("figure_under_a_file", "script", ["figure", "--campaign", "tiny", "--output",
                                       "DIR/tiny.toml/f.png", "--storage", "URL"],
     "cannot write the figure"),
    # a device that does not exist (cuda:99: no CUDA here, or not that many devices)
    ("unknown_device_worker", "module", ["worker", "--campaign", "tiny", "--device", "bogus",
                                         "--storage", "URL"], "--device 'bogus': not a device"),
    ("absent_cuda_device_worker", "script", ["worker", "--campaign", "tiny", "--device", "cuda:99",
                                             "--storage", "URL"], "--device cuda:99"),
    ("unknown_device_probe", "module", ["probe", "sharpness", "--campaign", "tiny", "--device",
                                        "bogus", "--storage", "URL"], "--device 'bogus'"),
    *([("cuda_on_cpu_only_worker", "module", ["worker", "--campaign", "tiny", "--device", "cuda:0",
                                              "--storage", "URL"], "CUDA is not available"),
       ("cuda_on_cpu_only_run", "script", ["run", "DIR/tiny.toml", "--device", "cuda",
                                           "--storage", "URL"], "CUDA is not available")]
      if not HAS_CUDA else []),
    # an unreachable PostgreSQL server, whatever the command (the dashboard: before
    # Streamlit starts)
    *[(f"unreachable_storage_{what}", "script", [*argv, "--storage", UNREACHABLE],
       "cannot connect to") for what, argv in (
        ("status", ["status"]), ("status_campaign", ["status", "--campaign", "tiny"]),
        ("results", ["results", "--campaign", "tiny"]),
        ("figure", ["figure", "--campaign", "tiny", "--output", "DIR/f.png"]),
        ("analyze", ["analyze", "--campaign", "tiny", "--output", "DIR/analysis"]),
        ("dashboard", ["dashboard", "--port", "8599"]), ("import", ["import-shallue", "DIR"]),
        ("probe", ["probe", "hessian", "--campaign", "tiny"]))],
]
ALL_CASES = [c[0] for c in CASES] + [c[0] for c in ARGV_CASES]
WORDS = {c[0]: c[-1] for c in CASES + ARGV_CASES}


def prepare_data(kind: str | None, folder: Path) -> Path | None:
    """Copies of the MNIST test files, broken in one way each."""
    if kind is None:
        return None
    data = folder / f"data_{kind}"
    if kind == "missing":
        return data  # never created
    data.mkdir()
    images, labels = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
    shutil.copy(MNIST_T10K / f"{labels}.gz", data)
    if kind == "checksum":  # one byte of the gzip changed: md5 mismatch
        raw = bytearray((MNIST_T10K / f"{images}.gz").read_bytes())
        raw[-100] ^= 0xFF
        (data / f"{images}.gz").write_bytes(bytes(raw))
        return data
    # Unpacked files are checked by their content's md5.
    raw = gzip.decompress((MNIST_T10K / f"{images}.gz").read_bytes())
    if kind == "corrupt":
        raw = b"\x00\x00\x99\x99" + raw[4:]
    elif kind == "truncated":
        raw = raw[: len(raw) // 2]
    (data / images).write_bytes(raw)
    return data


def digest(folder: Path) -> str:
    """Every file of the SQLite database (main file, WAL, shared memory)."""
    hasher = hashlib.sha256()
    for path in sorted(folder.glob("study.db*")):
        hasher.update(path.name.encode() + path.read_bytes())
    return hasher.hexdigest()


@pytest.fixture(scope="module")
def battery(tmp_path_factory):
    """Create the campaign 'tiny' once, then run every case at once (they write nothing)."""
    folder = tmp_path_factory.mktemp("bad")
    spec = folder / "tiny.toml"
    spec.write_text(TINY_SPEC)
    url = f"sqlite:///{folder / 'study.db'}"
    created = batchlab("campaign", "create", str(spec), "--storage", url)
    assert created.returncode == 0, created.stderr
    before = digest(folder)

    def run_argv(case):
        name, form, argv, _ = case
        argv = [a.replace("URL", url).replace("DIR", str(folder)) for a in argv]
        start = time.monotonic()
        result = (batchlab if form == "module" else batchlab_script)(*argv, timeout=120)
        return name, (result, time.monotonic() - start)

    def run(case):
        if len(case) == 4:
            return run_argv(case)
        name, command, text, storage, data_kind, _ = case
        data = prepare_data(data_kind, folder)
        args = []
        if text is not None:
            path = folder / f"{name}.toml"
            path.write_text(text.replace("DATA", str(data)) if data else text)
            args.append(str(path))
        if command == "worker":
            args += ["--campaign", "tiny"]
        start = time.monotonic()
        result = batchlab(*(["campaign", "create"] if command == "create" else command.split()), *args,
                          "--storage", storage or url, timeout=120)
        return name, (result, time.monotonic() - start)

    with ThreadPoolExecutor(3) as pool:
        results = dict(pool.map(run, CASES + ARGV_CASES))
    return results, before, digest(folder)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_CASES)
def test_one_line_exit_2_nothing_written(battery, name):
    results, before, after = battery
    words = WORDS[name]
    result, seconds = results[name]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert words in lines[0], lines[0]
    assert PASSWORD not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert after == before  # the database is byte-for-byte what it was
    if "storage" in name:
        # Fails fast: a URL that never worked is not retried. Retrying would run to the
        # backoff's deadline (300 s); the start-up alone took up to 36 s on 2 loaded cores,
        # so a fixed 30 s bound failed on load, not on retries.
        assert seconds < DEFAULT_BACKOFF.deadline_seconds / 3


def test_password_never_printed_by_a_successful_command(tmp_path, local_postgres):
    """A PostgreSQL URL with a password (the throwaway server trusts local users, so it
    connects): create, status and results print the URL with the password hidden."""
    import sqlalchemy as sa
    database = f"pw_{int(time.time() * 1000) % 10**8}"
    plain = sa.make_url(local_postgres.create_database(database))
    url = plain.set(password=PASSWORD).render_as_string(hide_password=False)
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY_SPEC)
    outputs = [batchlab("campaign", "create", str(spec), "--storage", url),
               batchlab("status", "--storage", url),
               batchlab("results", "--campaign", "tiny", "--storage", url)]
    assert [r.returncode for r in outputs] == [0, 0, 0], [r.stderr for r in outputs]
    assert all(PASSWORD not in r.stdout + r.stderr for r in outputs)
    assert "***" in outputs[0].stdout
