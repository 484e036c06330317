"""Hostile input: one line, exit 2, no traceback, and nothing run (no logs, no Ray)."""

import subprocess
import sys

import pytest

from engine.core.config import (
    MAX_CONFIG_BYTES,
    MAX_DEPTH,
    build_config,
    load_config,
    parse_override,
)
from engine.core.errors import ConfigError
from tests.conftest import ROOT, small_raw


@pytest.mark.parametrize("text, message", [
    ("rounds: 3\nseed: 1\nrounds: 4\n", "line 3: duplicate key 'rounds'"),
    ("task:\n  model: {kind: mlp, kind: cnn}\n", "line 2: duplicate key 'kind'"),
    ("", "the file is empty"),
    ("# only a comment\n", "the file is empty"),
    ("rounds: " + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5) + "\n",
     f"nested deeper than {MAX_DEPTH} levels"),
    ("rounds: " + "9" * 42 + "\n", "rounds: integer out of range"),
    ("rounds: " + "9" * 5000 + "\n", "not a usable value"),
    ("training: {lr: .inf}\n", "training.lr: must be a finite number"),
    ("training: {lr: .nan}\n", "training.lr: must be a finite number"),
    ("attack: {kind: gaussian, fraction: 0.2, std: 1.0e39}\n", "attack.std: must be a finite"),
    ("experiment: ..\n", "experiment: String should match pattern"),
    ("experiment: a/b\n", "experiment: String should match pattern"),
    ("a: &a [*a]\nrounds: 3\n", "a[0]: a recursive YAML alias"),
    ("task: &t {model: *t}\n", "task.model: a recursive YAML alias"),
    ("a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n"
        for p, c in zip("abcdef", "bcdefg", strict=True)),
     "expands to more than 100,000 values"),
])
def test_hostile_files_are_one_line_config_errors(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert len(str(err.value)) < 300  # echoed values are cut


def test_oversized_files_are_refused_before_parsing(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("rounds: 3\n" + "#" * MAX_CONFIG_BYTES)
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        load_config(path)


def test_echoed_values_are_cut():
    with pytest.raises(ConfigError) as err:
        build_config(small_raw(experiment="x/" * 50_000))
    assert len(str(err.value)) < 300 and "chars)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_override("rounds" + "=" + "1" * 100_000)
    assert len(str(err.value)) < 300


def test_integers_beyond_int64_in_overrides():
    path, value = parse_override("rounds=" + "9" * 42)
    with pytest.raises(ConfigError, match="rounds: integer out of range"):
        build_config(small_raw(rounds=value))
    with pytest.raises(ConfigError, match="rounds: Input should be less than or equal to"):
        build_config(small_raw(rounds=10**12))


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "run.py", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


CASES = ["duplicate", "log_dir_file", "escape", "inf", "long", "recursive_override",
         "laughs_override", "experiment_is_a_file", "log_dir_under_a_file", "disconnected"]


@pytest.mark.parametrize("case", CASES)
def test_hostile_command_lines_exit_2_before_anything_runs(tmp_path, case):
    logs = tmp_path / "logs"
    config = tmp_path / "c.yaml"
    config.write_text((ROOT / "configs/quickstart.yaml").read_text())
    if case == "duplicate":
        config.write_text(config.read_text() + "rounds: 5\n")
    elif case == "log_dir_file":
        logs.write_text("a file")
    elif case == "experiment_is_a_file":  # a valid --log-dir, its experiment folder a file
        logs.mkdir()
        (logs / "quickstart").write_text("a file")
    elif case == "log_dir_under_a_file":
        (tmp_path / "f").write_text("a file")
        logs = tmp_path / "f" / "logs"
    laughs = "&a [1,1,1,1,1,1,1,1,1,1]" + "".join(f",&{c} [{','.join(['*' + p] * 10)}]"
                                                   for p, c in zip("abcdef", "bcdefg", strict=True))
    extra = {"escape": ["experiment=.."], "inf": ["training.lr=.inf"],
             "long": ["task.model.kind=" + "x" * 100_000],
             "recursive_override": ["x=&a [*a]"], "laughs_override": [f"x=[{laughs}]"],
             "disconnected": ["mode=decentralized", "topology.kind=erdos_renyi",
                              "topology.p=0.001", "population.participation=null"],
             }.get(case, [])
    before = sorted(p.name for p in tmp_path.iterdir())
    done = run(str(config), *extra, "--log-dir", str(logs))
    assert done.returncode == 2, done.stderr[-500:]
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert len(done.stderr) < 400
    # nothing was written: it failed before the run started
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "experiment_is_a_file":
        assert "the experiment folder" in done.stderr and [p.name for p in logs.iterdir()] \
            == ["quickstart"]


def test_a_full_disk_ends_with_one_line_and_the_outcome_row_where_it_fits(tmp_path):
    """A real write failure: the process may not write files over 10 kB (RLIMIT_FSIZE, with
    SIGXFSZ ignored, so write() fails with EFBIG as it would with ENOSPC). The runs table's
    config alone is larger: its write fails; the small outcome row still fits. One line,
    exit 1, no partial file left, and the outcome says why."""
    import resource
    import signal

    from engine.records.logs import read_table

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))

    done = subprocess.run(
        [sys.executable, "run.py", "configs/quickstart.yaml", "rounds=3", "--backend",
         "inline", "--no-progress", "--log-dir", str(tmp_path)], cwd=ROOT,
        capture_output=True, text=True, timeout=120, preexec_fn=limited)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "too large" in done.stderr.lower() or "space" in done.stderr.lower()
    assert not list(tmp_path.rglob("*.tmp"))
    (outcome,) = read_table(tmp_path / "quickstart", "outcomes").to_pylist()
    assert outcome["status"] == "failed" and "File too large" in outcome["error"]
