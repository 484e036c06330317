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


@pytest.mark.parametrize("case", ["duplicate", "log_dir_file", "escape", "inf", "long"])
def test_hostile_command_lines_exit_2_before_anything_runs(tmp_path, case):
    logs = tmp_path / "logs"
    config = tmp_path / "c.yaml"
    config.write_text((ROOT / "configs/quickstart.yaml").read_text())
    args = {
        "duplicate": lambda: config.write_text(config.read_text() + "rounds: 5\n"),
        "log_dir_file": lambda: logs.write_text("a file"),
        "escape": lambda: None, "inf": lambda: None, "long": lambda: None,
    }[case]
    args()
    extra = {"escape": ["experiment=.."], "inf": ["training.lr=.inf"],
             "long": ["task.model.kind=" + "x" * 100_000]}.get(case, [])
    done = run(str(config), *extra, "--log-dir", str(logs))
    assert done.returncode == 2, done.stderr[-500:]
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert len(done.stderr) < 400
    assert not logs.is_dir()  # nothing was written: it failed before the run started
