"""run.py exactly as the README shows it, as a subprocess; bad input gets one line and exit 2."""

import re
import subprocess
import sys

import pytest

from engine.logs import CLIENTS, ROUNDS, RUNS, read_table
from tests.conftest import ROOT


def run(*args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, "run.py", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^python run\.py .*$", text, flags=re.M)


def test_readme_shows_the_quickstart_command():
    assert "python run.py configs/quickstart.yaml" in readme_commands()


def test_quickstart_as_in_readme_then_analyze(tmp_path):
    """The README's quickstart command, in a copy of its working directory."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "quickstart.yaml").write_text(
        (ROOT / "configs" / "quickstart.yaml").read_text())
    (tmp_path / "run.py").write_text((ROOT / "run.py").read_text())
    done = run("configs/quickstart.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "logs: logs/quickstart/" in done.stdout
    accuracy = float(re.search(r"final (\d\.\d+)", done.stdout).group(1))
    assert accuracy >= 0.65  # README states ~0.74; a centrally trained MLP reaches ~0.88
    logs = tmp_path / "logs" / "quickstart"
    for name, schema, rows in [("runs", RUNS, 1), ("rounds", ROUNDS, 100),
                               ("clients", CLIENTS, 100 * 20)]:
        table = read_table(logs, name)
        assert table.num_rows == rows
        assert table.schema.remove(table.schema.get_field_index("run_id")) == schema
    summary = run("analyze", "logs/quickstart", cwd=tmp_path)
    assert summary.returncode == 0, summary.stderr
    assert "final_accuracy" in summary.stdout and f"{accuracy:.3f}" in summary.stdout


def test_byzantine_command_from_the_issue_then_analyze(tmp_path):
    """The policy-library command as a user types it (Ray backend); analyze names both sides."""
    done = run("configs/byzantine_alie.yaml", "aggregation=trimmed_mean", "attack.kind=alie",
               "attack.fraction=0.2", "rounds=20", "--log-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    summary = run("analyze", str(tmp_path / "byzantine"))
    assert summary.returncode == 0, summary.stderr
    row = summary.stdout.splitlines()[2]
    assert "trimmed_mean" in row and "alie@0.2" in row


@pytest.mark.parametrize("args, message", [
    (["configs/quickstart.yaml", "attack.kind=nope"], "attack.kind: unknown attack 'nope'"),
    (["configs/quickstart.yaml", "aggregation={krum: {f: -1}}"],
     "aggregation[0].krum.f: Input should be greater than or equal to 0"),
    (["configs/missing.yaml"], "configs/missing.yaml: config file not found"),
    (["configs/quickstart.yaml", "populaton.num_clients=5"], "populaton: unknown key"),
    (["configs/quickstart.yaml", "rounds=ten"], "rounds: Input should be a valid integer"),
    (["configs/quickstart.yaml", "training.lr=-0.5"], "training.lr: Input should be greater"),
    (["configs/quickstart.yaml", "population.participation.fraction=1.5"],
     "population.participation.fraction: Input should be less than or equal to 1"),
    (["configs/quickstart.yaml", "aggregation=nope"], "aggregation[0]: unknown stage 'nope'"),
    (["configs/quickstart.yaml", "--backend", "gpu"], "invalid choice: 'gpu'"),
    (["analyze", "logs/does-not-exist"], "no runs found"),
    (["configs/digits.yaml", "task.test_fraction=0.0002"], "holds out no test sample"),
    (["configs/quickstart.yaml", "aggregation=:x"], "cannot import ':x'"),
    (["configs/quickstart.yaml", "--address", "127.0.0.1:1"], "no Ray cluster answers there"),
])
def test_bad_input_is_one_line_exit_2(args, message):
    done = run(*args)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert message in done.stderr


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1,\n")
    done = run(str(bad))
    assert done.returncode == 2 and "is not valid YAML" in done.stderr
