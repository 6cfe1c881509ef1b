"""What `batchlab status` and `batchlab results` print, on a database with known rows
(tests/app/conftest.py's `build_database`: campaign `demo_scaling` with results at B = 16
to 128 and none yet at B = 256, and `other_campaign`), and how they end when their reader
goes away (`| head`)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from study.cli import main
from tests.app.conftest import CAMPAIGN, OTHER, STEPS_TO_RESULT, build_database
from tests.study.conftest import CONSOLE_SCRIPT

NO_REAPING = ["--grace", "1e9"]  # the fixture's running trial stays as it is


@pytest.fixture(scope="module")
def known_db(tmp_path_factory) -> str:
    return build_database(tmp_path_factory.mktemp("known") / "known.db")


def test_status_prints_whole_steps_and_a_dash_where_no_result(known_db, capsys):
    assert main(["status", "--campaign", CAMPAIGN, *NO_REAPING, "--storage", known_db]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = lines[1].split()
    rows = {int(line.split()[0]): line.split() for line in lines[2:]}
    column = header.index("steps_to_result")
    assert {b: row[column] for b, row in rows.items()} == {
        **{b: str(steps) for b, steps in STEPS_TO_RESULT.items()}, 256: "-"}
    assert ".0" not in "\n".join(lines[1:])


def test_results_table_starts_with_its_title(known_db, capsys):
    """`results` prints the campaign line first (`| head -1` shows it), then the table."""
    assert main(["results", "--campaign", CAMPAIGN, "--storage", known_db]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{CAMPAIGN}: ") and "steps_to_result" in lines[1]


@pytest.mark.parametrize("command", [["results"], ["status", *NO_REAPING]])
def test_unknown_campaign_lists_the_known_ones(known_db, capsys, command):
    assert main([*command, "--campaign", "nope", "--storage", known_db]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: no campaign named 'nope'; known campaigns: {CAMPAIGN}, {OTHER}"]


@pytest.mark.parametrize("command", [
    ["results", "--campaign", CAMPAIGN], ["results", "--campaign", CAMPAIGN, "--format", "csv"],
    ["status", *NO_REAPING], ["workloads"]])
def test_a_reader_that_goes_away_ends_the_command_quietly(known_db, command):
    """`batchlab results | head -1`: the pipe's reader is gone before the command writes
    (here it never reads), so every write fails with EPIPE. The command stops with the
    status of a process ended by SIGPIPE (141, as `cat` or `seq` do) and prints nothing,
    no BrokenPipeError traceback."""
    storage = ["--storage", known_db] if command[0] != "workloads" else []
    process = subprocess.Popen([sys.executable, "-c", CONSOLE_SCRIPT, *command, *storage],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader goes away at once
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141, err
    assert err == ""


@pytest.mark.parametrize("command", [["results", "--campaign", CAMPAIGN], ["status", *NO_REAPING],
                                     ["status", "--campaign", "nope", *NO_REAPING]])
def test_reading_commands_do_not_import_torch(known_db, command):
    """status (which also reaps lost trials), results and their "no campaign" error read SQL
    only: importing torch would double their time (~2 s of a ~4 s `batchlab status`)."""
    script = ("import sys; from study.cli import main; code = main(sys.argv[1:]); "
              "print('torch imported' if 'torch' in sys.modules else 'no torch', code)")
    done = subprocess.run([sys.executable, "-c", script, *command, "--storage", known_db],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == f"no torch {2 if 'nope' in command else 0}", done.stderr


def test_a_worker_imports_neither_scikit_learn_nor_pandas_nor_scipy_stats():
    """Every worker process pays its imports: the worker's modules do without pandas and
    scipy's stats and optimize (needed by commands that read, analyse or create), and the
    digits workload reads scikit-learn's file without importing scikit-learn: ~2.5 s of
    each process's start on 2 cores, before torch's own."""
    script = ("import sys, study.worker; from trainers.workloads import DataOptions, get_workload; "
              "get_workload('digits_mlp').load_data(DataOptions()); print(sorted(m for m in ('sklearn', "
              "'pandas', 'scipy.stats', 'scipy.optimize') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1:] == ["[]"], (done.stdout, done.stderr)
