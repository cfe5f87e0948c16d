"""The mutation check's mutants still fit the code they mutate (its run itself is `python tools/mutation_check.py`)."""

import ast

import pytest

import mutation_check
from conftest import REPO


def test_every_mutant_applies_once_inside_its_function():
    sources = {}
    for mutant in mutation_check.MUTANTS:
        source = sources.setdefault(mutant.path, (REPO / mutant.path).read_text())
        mutated = mutation_check.mutate(source, mutant)
        assert mutated != source
        ast.parse(mutated)  # still Python
    names = [(m.function, m.old) for m in mutation_check.MUTANTS]
    assert len(names) == len(set(names))


def test_every_mutant_names_tests_that_exist():
    defined = {}
    for mutant in mutation_check.MUTANTS:
        for test in mutant.tests:
            path, _, name = test.partition("::")
            if path not in defined:
                tree = ast.parse((REPO / path).read_text())
                defined[path] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            assert not name or name in defined[path], test


def test_a_mutant_outside_its_function_is_refused():
    source = "def f(x):\n    return x + 1\n\n\ndef g(x):\n    return x - 1\n"
    wrong = mutation_check.Mutant("m.py:g", "", "x + 1", "x + 2")
    with pytest.raises(ValueError, match="occurs 0 times"):
        mutation_check.mutate(source, wrong)
    right = mutation_check.Mutant("m.py:g", "", "x - 1", "x - 2")
    assert mutation_check.mutate(source, right) == source.replace("x - 1", "x - 2")


def test_the_table_replaces_only_its_section(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nkept\n")
    for text in ("first", "second"):
        mutation_check.write_section(path, text)
    content = path.read_text()
    assert "kept" in content and "second" in content and "first" not in content
    assert content.count(mutation_check.START) == 1
