"""The layering: every import (lazy ones too) goes down a layer, never back up."""

from tests.layers import LAYERS, ROOT, group, modules, violations


def test_no_import_runs_back_up_a_layer():
    assert violations() == []


def test_every_module_belongs_to_a_declared_layer():
    assert {group(m) for m, _ in modules()} <= set(LAYERS)


def test_engine_top_level_is_only_the_wiring():
    wiring = [p.name for p in (ROOT / "engine").glob("*.py") if p.name != "__init__.py"]
    assert len(wiring) <= 8, wiring


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """A core module importing a policy is caught (the checker can fail)."""
    import tests.layers as layers

    fake = tmp_path / "engine" / "core"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from policies import robust\n")
    monkeypatch.setattr(layers, "ROOT", tmp_path)
    assert "engine/core/bad.py:2: engine.core imports policies.robust" in layers.violations()
