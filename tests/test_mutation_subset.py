"""tests/mutation_subset.py: the triage that restricts each mutated function to a few fast covering tests."""

import json

import mutation_subset as ms


def _stats():
    return {"duration_by_test": {"a.py::t1": 0.1, "a.py::t2": 0.2, "a.py::t3": 3.0, "b.py::t1": 0.5,
                                 "b.py::t2": 0.05, "c.py::t1": 9.0},
            "tests_by_mangled_function_name": {
                "kernels._runtime.layout.x_real": ["a.py::t3", "a.py::t1", "b.py::t1", "a.py::t2", "b.py::t2",
                                           "c.py::t1"],
                "kernels._layout_extra.x_f": ["a.py::t1"],
                "kernels._runtime.state.x_g": ["c.py::t1"]}}


def test_restrict_takes_the_fastest_tests_of_each_file_in_turn_within_the_budget():
    stats = _stats()
    changed = ms.restrict(stats, ["kernels._runtime.layout"], per_file=12, budget=1.0)
    assert changed == {"kernels._runtime.layout.x_real": (6, 4)}  # not kernels._layout_extra: a module, not a prefix
    assert stats["tests_by_mangled_function_name"]["kernels._runtime.layout.x_real"] == [
        "a.py::t1", "b.py::t2", "a.py::t2", "b.py::t1"]
    stats = _stats()
    ms.restrict(stats, ["kernels._runtime.layout"], per_file=1, budget=100.0)
    assert stats["tests_by_mangled_function_name"]["kernels._runtime.layout.x_real"] == ["a.py::t1", "b.py::t2",
                                                                                 "c.py::t1"]
    assert stats["tests_by_mangled_function_name"]["kernels._runtime.state.x_g"] == ["c.py::t1"]


def test_main_keeps_the_full_coverage_and_restores_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert ms.main(["kernels._runtime.layout"]) == 1
    assert "run `mutmut run` once first" in capsys.readouterr().err
    (tmp_path / "mutants").mkdir()
    (tmp_path / "mutants" / "mutmut-stats.json").write_text(json.dumps(_stats()))
    assert ms.main(["kernels._nothing"]) == 1
    assert ms.main(["kernels._runtime.layout", "--budget", "1"]) == 0
    restricted = json.loads((tmp_path / "mutants" / "mutmut-stats.json").read_text())
    assert len(restricted["tests_by_mangled_function_name"]["kernels._runtime.layout.x_real"]) == 4
    assert ms.main(["kernels._runtime.state", "--budget", "1"]) == 0  # from the full coverage; keeps the rest
    restricted = json.loads((tmp_path / "mutants" / "mutmut-stats.json").read_text())
    assert len(restricted["tests_by_mangled_function_name"]["kernels._runtime.layout.x_real"]) == 4
    assert restricted["tests_by_mangled_function_name"]["kernels._runtime.state.x_g"] == []
    assert ms.main(["--restore"]) == 0
    assert json.loads((tmp_path / "mutants" / "mutmut-stats.json").read_text()) == _stats()
    assert ms.main(["--restore"]) == 1


def test_files_keeps_only_the_tests_of_the_named_files(tmp_path, monkeypatch, capsys):
    stats = _stats()
    ms.restrict(stats, ["kernels._runtime.layout"], per_file=12, budget=100.0, files=["b.py", "c.py"])
    assert stats["tests_by_mangled_function_name"]["kernels._runtime.layout.x_real"] == ["b.py::t2", "c.py::t1",
                                                                                 "b.py::t1"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mutants").mkdir()
    (tmp_path / "mutants" / "mutmut-stats.json").write_text(json.dumps(_stats()))
    try:
        ms.main(["kernels._runtime.layout", "--files", "b.py", "tests/nothing.py"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("an unknown file was accepted")
    assert "--files: no recorded test in tests/nothing.py" in capsys.readouterr().err
    assert ms.main(["kernels._runtime.layout", "--files", "c.py", "--budget", "100"]) == 0
    restricted = json.loads((tmp_path / "mutants" / "mutmut-stats.json").read_text())
    assert restricted["tests_by_mangled_function_name"]["kernels._runtime.layout.x_real"] == ["c.py::t1"]
