"""The paper concordance (refnorm/errata/equations.py, the docs' equations page): the registry,
the ``# Eq. (n)`` tags in the code and the tests it cites agree, and every cell of the page's
tables is filled. None of this needs the documentation built."""

from __future__ import annotations

import ast
import re
import sys
import types
from pathlib import Path

import pytest

from refnorm.errata import equations as eq

ROOT = Path(__file__).resolve().parents[2]


def defined_tests(path: Path) -> set[str]:
    """The test functions a test file defines, at module level or in a class."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        names |= {f"{cls.name}::{m.name}" for m in cls.body if isinstance(m, ast.FunctionDef)}
    return names


def missing_tests(cited: list[str], root: Path = ROOT) -> list[str]:
    """The cited ``tests/x.py::test_y`` that do not exist."""
    out = []
    for test in cited:
        path, _, name = test.partition("::")
        if not (root / path).is_file() or name not in defined_tests(root / path):
            out.append(test)
    return out


@pytest.fixture(scope="module")
def tags() -> list[eq.Tag]:
    """The tags in refnorm's code (one scan for the module's tests)."""
    found = eq.scan()
    assert found.problems == []
    return found.tags


def _cells(row: str) -> list[str]:
    """A Markdown table row's cells, split on the pipes that are not escaped."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


# -- the registry, the tags, the tests ----------------------------------------------------------


def test_every_tag_names_a_registered_equation_of_a_named_paper():
    assert eq.scan().problems == []


def test_registry_and_tags_agree(tags):
    # every implemented equation has a tagged line, a corrected form outside the errata for
    # every printed-wrong one, a reason for every one not implemented...
    assert eq.registry_problems(tags) == []


def test_every_cited_test_exists():
    cited = [t for e in eq.EQUATIONS for t in e.tests]
    assert len(cited) >= len(eq.EQUATIONS)
    assert missing_tests(cited) == []


def test_every_paper_has_its_equations():
    # the numbered equations of each paper, as printed (Gitman & Ginsburg's display
    # formulas, numbered in order of appearance)
    assert {k: len(eq.equations(k)) for k in eq.PAPERS} == {"snj": 25, "snd": 1, "ws": 19,
                                                              "gg": 7}


def test_the_checks_catch_what_they_are_for(tmp_path, tags):
    # a registered equation that no line computes
    without = [t for t in tags if (t.paper, t.number) != ("snj", 9)]
    assert any("Eq. (9)" in p for p in eq.registry_problems(without))
    # a tag that names an equation the registry lacks, and one that names no paper
    pkg = tmp_path / "refnorm"
    pkg.mkdir()
    (pkg / "a.py").write_text('"""After Qiao et al."""\nx = 1  # Eq. (99)\n')
    (pkg / "b.py").write_text('"""No paper."""\ny = 2  # Eq. (3)\n')
    problems = eq.scan(pkg).problems
    assert any("a.py:2" in p and "lacks" in p for p in problems), problems
    assert any("b.py:2" in p and "names no paper" in p for p in problems), problems
    # a cited test that does not exist
    assert missing_tests(["tests/errata/test_equations.py::test_no_such_test",
                          "tests/no_such_file.py::test_x"]) == [
        "tests/errata/test_equations.py::test_no_such_test", "tests/no_such_file.py::test_x"]


def test_tags_are_comments_after_code(tmp_path):
    pkg = tmp_path / "refnorm"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        '"""Weight Standardization (Qiao et al.): Eq. (2) in a docstring is no tag.\n\n'
        '    y = W^ * x      # Eq. (3)\n"""\n\n'
        "# Eq. (4): a comment on its own line heads a block\n"
        "def f(w):\n"
        "    s = 'Eq. (5) in a string'\n"
        "    return w  # Eq. (12)-(14), and SN Eq. (2), GG Eq. (7)\n")
    found = [(t.paper, t.number, t.line, t.scope) for t in eq.scan(pkg).tags]
    assert found == [("ws", 12, 9, ("f",)), ("ws", 13, 9, ("f",)), ("ws", 14, 9, ("f",)),
                     ("snj", 2, 9, ("f",)), ("gg", 7, 9, ("f",))]


def test_parse_tag():
    assert eq.parse_tag("# (N, C, 1)  Eq. (12)-(14)") == [(None, 12), (None, 13), (None, 14)]
    assert eq.parse_tag("# Eq. (6), (7), (8)") == [(None, 6), (None, 7), (None, 8)]
    assert eq.parse_tag("# Eq. (9) 2w(h-mu_in)/HW") == [(None, 9)]
    assert eq.parse_tag("# the single-GPU Eq. (7)") == [(None, 7)]
    assert eq.parse_tag("# SND Eq. (1); WS Eq. (1), (7)") == [("SND", 1), ("WS", 1), ("WS", 7)]
    assert eq.parse_tag("# see Eq. 4 and §3.2") == []


def test_a_module_takes_the_first_paper_its_docstring_cites():
    assert eq.module_paper("SN (Luo et al., journal version); the study of distinct "
                           "normalizers") == "snj"
    assert eq.module_paper("NP (Arpit et al.), as written by\nGitman & Ginsburg") == "gg"
    assert eq.module_paper("Two-dimensional convolution.") is None


def test_the_verdicts_are_backed_as_the_page_says():
    for e in eq.EQUATIONS:
        if e.verdict == eq.PRINTED_WRONG:
            # an errata test shows the printed form failing and the corrected one passing
            assert any(t.startswith("tests/errata/") for t in e.tests), e
        if e.verdict == eq.VERIFIED:
            assert e.tests, e


# -- the page --------------------------------------------------------------------------------


@pytest.mark.parametrize("paper", sorted(eq.PAPERS))
def test_every_cell_of_the_table_is_filled(paper, tags):
    rows = eq.table(paper, tags).splitlines()
    header = _cells(rows[0])
    assert len(header) == 6
    assert len(rows) == 2 + len(eq.equations(paper))
    for e, row in zip(eq.equations(paper), rows[2:], strict=True):
        cells = _cells(row)
        assert len(cells) == len(header), row
        assert all(cells), row
        assert f'<span id="{e.anchor}"></span>' in cells[0]


def test_anchors_follow_the_scheme_and_are_unique():
    anchors = [e.anchor for e in eq.EQUATIONS]
    assert len(set(anchors)) == len(anchors)
    assert all(re.fullmatch(r"eq-(snj|snd|ws|gg)-\d+", a) for a in anchors)
    assert eq.lookup("snj", 9).anchor == "eq-snj-9"


def test_every_link_names_an_object_that_exists(tags):
    import importlib

    text = "\n".join(eq.table(k, tags) for k in eq.PAPERS)
    targets = re.findall(r"\{(?:func|class|meth|mod)\}`~?([\w.]+)`", text)
    assert len(targets) > 40
    for target in targets:
        parts = target.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for name in parts[cut:]:
                obj = getattr(obj, name)
            break


def test_the_errata_sections_linked_exist():
    labels = set(re.findall(r"^\(([\w-]+)\)=$", (ROOT / "docs" / "errata.md").read_text(),
                            re.M))
    linked = {e.errata for e in eq.EQUATIONS if e.errata}
    linked |= set(re.findall(r"\{ref\}`[^<`]*<([\w-]+)>`",
                             " ".join(e.note for e in eq.EQUATIONS)))
    assert linked and linked <= labels, linked - labels


def test_the_page_shows_every_paper():
    page = (ROOT / "docs" / "equations.md").read_text()
    for key in eq.PAPERS:
        assert f'equations.table("{key}"' in page
    assert "equations.coverage_markdown()" in page


def test_the_readme_states_the_generated_figures():
    readme = " ".join((ROOT / "README.md").read_text().split())
    for key in eq.PAPERS:
        assert eq.coverage_line(key) in readme, eq.coverage_line(key)


def test_a_tag_in_a_method_names_its_class_and_the_method(tmp_path):
    """The page's "computed by" cell names the method, not only its class."""
    pkg = tmp_path / "refnorm"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        '"""After Qiao et al."""\n\n'
        "class Layer:\n"
        "    def _forward(self, w):\n"
        "        return w  # Eq. (3)\n")
    found = [(t.number, t.scope) for t in eq.scan(pkg).tags]
    assert found == [(3, ("Layer", "_forward"))]


def test_the_cell_of_a_private_method_names_the_method():
    tags = eq.scan().tags
    cell = eq.code_cell(eq.lookup("gg", 3), tags)
    assert "`_forward` of {class}`~refnorm.weights.weight_norm.WeightNorm`" in cell, cell


def test_each_printed_wrong_row_links_the_section_that_checks_its_equation():
    """A section of the errata page whose heading gives a range, "Eq. (6)–(14)", checks the
    equations of that range: a printed-wrong row links the one that holds its number."""
    text = (eq.ROOT / "docs" / "errata.md").read_text()
    ranges = {label: (int(a), int(b)) for label, a, b in re.findall(
        r"^\(([\w-]+)\)=\n## .*Eq\. \((\d+)\)–\((\d+)\)", text, re.M)}
    rows = [e for e in eq.EQUATIONS if e.verdict == eq.PRINTED_WRONG]
    assert rows
    for e in rows:
        assert e.errata in ranges, e
        low, high = ranges[e.errata]
        assert low <= e.number <= high, (e.paper, e.number, e.errata)


def test_a_range_with_an_en_dash_names_every_equation():
    assert eq.parse_tag("# Eq. (12)–(14)") == [(None, 12), (None, 13), (None, 14)]
    assert eq.parse_tag("# WS Eq. (17)–(19)") == [("WS", 17), ("WS", 18), ("WS", 19)]


def test_each_rule_of_the_registry_names_the_row_that_breaks_it(monkeypatch):
    """A registry of rows that each break one rule of the verdicts (module docstring): each
    rule reports its row, and a registry that keeps them all reports nothing."""
    tag = eq.Tag("ws", 1, "refnorm/x.py", 1, "refnorm.x", ())
    in_errata = eq.Tag("ws", 2, "refnorm/errata/x.py", 1, "refnorm.errata.x", ())
    rows = (
        eq.Equation("ws", 1, "a", "w", eq.PRINTED_WRONG, ("t",)),               # no label
        eq.Equation("ws", 2, "a", "w", eq.PRINTED_WRONG, ("t",), errata="e"),   # errata tag only
        eq.Equation("ws", 3, "a", "w", eq.DEFINITION, ("t",)),                  # nothing tagged
        eq.Equation("ws", 4, "a", "w", eq.NOT_IMPLEMENTED, ("t",), untagged="u"),  # no reason
        eq.Equation("ws", 5, r"\lvert a|", "w", eq.NOT_IMPLEMENTED, (), note="r",
                    untagged="u"),                                              # |, no test
        eq.Equation("ws", 6, "a", "w", "verified?", ("t",), untagged="u"),      # unknown verdict
        eq.Equation("ws", 6, "a", "w", eq.NOT_IMPLEMENTED, ("t",), note="r", untagged="u"),
        eq.Equation("ws", 8, "a", "w", eq.NOT_IMPLEMENTED, ("t",), note="r", untagged="u"),
    )
    monkeypatch.setattr(eq, "EQUATIONS", rows)
    problems = eq.registry_problems([tag, in_errata])
    expected = {
        "WS Eq. (1): printed wrong needs its errata section's label",
        "WS Eq. (2): printed wrong, but no line outside the errata computes the corrected form",
        "WS Eq. (3) is 'definition only' but no line is tagged with it",
        "WS Eq. (3): nothing is tagged, so the row needs `untagged`",
        "WS Eq. (4): not implemented needs its reason",
        "WS Eq. (5): no test backs the verdict",
        "WS Eq. (5): a | in the LaTeX would end the table cell",
        "WS Eq. (6): unknown verdict 'verified?'",
        "WS Eq. (6) is registered twice",
        "WS: the numbers [1, 2, 3, 4, 5, 6, 6, 8] are not 1..8",
    }
    assert expected <= set(problems), sorted(expected - set(problems))
    # a code line tagged with an equation the registry says is not implemented
    monkeypatch.setattr(eq, "EQUATIONS", (
        eq.Equation("ws", 1, "a", "w", eq.NOT_IMPLEMENTED, ("t",), note="r"),))
    assert eq.registry_problems([tag]) == [
        "WS Eq. (1) is not implemented but refnorm/x.py:1 is tagged"]
    # the same row, tagged only in the errata, and a printed-wrong row done right: no problem
    monkeypatch.setattr(eq, "EQUATIONS", (
        eq.Equation("ws", 1, "a", "w", eq.PRINTED_WRONG, ("t",), errata="e"),
        eq.Equation("ws", 2, "a", "w", eq.NOT_IMPLEMENTED, ("t",), note="r")))
    assert eq.registry_problems([tag, in_errata]) == []


def test_a_tag_may_mix_a_list_a_range_and_words():
    """"# Eq. (2), (4)-(6)": the range starts after the number just before it, not after the
    first; "and" and "&" list like a comma."""
    assert eq.parse_tag("# Eq. (2), (4)-(6)") == [(None, 2), (None, 4), (None, 5), (None, 6)]
    assert eq.parse_tag("# Eq. (10) and (11)") == [(None, 10), (None, 11)]
    assert eq.parse_tag("# WS Eq. (5) & (6)") == [("WS", 5), ("WS", 6)]


def test_the_fast_kernels_are_not_scanned(tmp_path):
    """The kernels carry no tags (module docstring): a tag there is not part of the concordance,
    while the same tag in a reference module is."""
    pkg = tmp_path / "refnorm"
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "norms").mkdir()
    for sub in ("kernels", "norms"):
        (pkg / sub / "m.py").write_text('"""After Qiao et al."""\nx = 1  # Eq. (3)\n')
    found = eq.scan(pkg)
    assert found.problems == []
    assert [(t.path, t.number) for t in found.tags] == [("refnorm/norms/m.py", 3)]


def test_a_tag_in_a_package_init_names_the_package(tmp_path):
    pkg = tmp_path / "refnorm" / "weights"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""After Qiao et al."""\nx = 1  # Eq. (2)\n')
    [tag] = eq.scan(tmp_path / "refnorm").tags
    assert (tag.module, tag.path, tag.number) == (
        "refnorm.weights", "refnorm/weights/__init__.py", 2)


def _tag(module: str, line: int, scope: tuple[str, ...]) -> eq.Tag:
    path = module.replace(".", "/") + ".py"
    return eq.Tag("snj", 4, path, line, module, scope)


def test_the_code_cell_shows_the_reference_first_then_private_helpers_then_the_errata():
    """Public reference functions first, a private helper named in code after its module's
    link, and the errata's transcriptions last, marked "in the errata", each whatever its path
    or line; the lines of one function together."""
    sn, errata = "refnorm.norms.switchable_norm", "refnorm.errata.sn_appendix"
    tags = [_tag(errata, 1, ("printed_eq4",)), _tag(sn, 2, ("_fused",)),
            _tag(sn, 3, ("in_moments",)), _tag(sn, 5, ("in_moments",))]
    cell = eq.code_cell(eq.lookup("snj", 4), tags)
    assert cell.split("<br>") == [
        "{func}`~refnorm.norms.switchable_norm.in_moments` `switchable_norm.py:3, 5`",
        "`_fused` in {mod}`refnorm.norms.switchable_norm` `switchable_norm.py:2`",
        "in the errata: {func}`~refnorm.errata.sn_appendix.printed_eq4` `sn_appendix.py:1`",
    ], cell


def test_the_code_cell_links_with_the_role_of_what_it_names():
    """A function takes {func}, a class {class}, a public method {meth}: a role of the wrong
    kind is a broken link in Sphinx."""
    wn = "refnorm.weights.weight_norm"
    cases = {("weight_norm_forward",): "{func}`~refnorm.weights.weight_norm.weight_norm_forward`",
             ("WeightNorm",): "{class}`~refnorm.weights.weight_norm.WeightNorm`",
             ("WeightNorm", "forward"): "{meth}`~refnorm.weights.weight_norm.WeightNorm.forward`"}
    for scope, link in cases.items():
        cell = eq.code_cell(eq.lookup("snj", 4), [_tag(wn, 7, scope)])
        assert cell == f"{link} `weight_norm.py:7`", cell


def test_an_undocumented_function_is_named_after_a_link_to_its_module(monkeypatch):
    """The API reference has no entry for a function without a docstring: the cell names it
    in code and links the module that holds it."""
    module = types.ModuleType("refnorm_undocumented")
    exec("def helper():\n    return 1\n\ndef documented():\n    \"\"\"Doc.\"\"\"\n",
         module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    cell = eq.code_cell(eq.lookup("snj", 4), [_tag(module.__name__, 2, ("helper",))])
    assert cell == "`helper` in {mod}`refnorm_undocumented` `refnorm_undocumented.py:2`", cell
    cell = eq.code_cell(eq.lookup("snj", 4), [_tag(module.__name__, 4, ("documented",))])
    assert cell == "{func}`~refnorm_undocumented.documented` `refnorm_undocumented.py:4`", cell


def test_the_checked_by_cell_names_each_test_and_its_file():
    e = eq.Equation("ws", 1, "a", "w", eq.VERIFIED,
                    ("tests/errata/test_x.py::test_a", "tests/sync/test_y.py::test_b"))
    assert eq.tests_cell(e) == ("`test_a` in `errata/test_x.py`<br>"
                                "`test_b` in `sync/test_y.py`")


def test_the_verdict_cell_joins_its_note_as_the_page_reads():
    """"not implemented, because <reason>"; every other verdict "<verdict>: <note>", the
    printed-wrong one after its link to the errata section."""
    def cell(verdict, **kw):
        return eq.verdict_cell(eq.Equation("ws", 1, "a", "w", verdict, ("t",), **kw))

    assert cell(eq.NOT_IMPLEMENTED, note="r") == "**not implemented**, because r"
    assert cell(eq.VERIFIED, note="n") == "**implemented and verified**: n"
    assert cell(eq.VERIFIED) == "**implemented and verified**"
    assert cell(eq.DEFINITION, note="n") == "**definition only**: n"
    assert cell(eq.PRINTED_WRONG, note="n", errata="lbl") == (
        "**printed form wrong**, see {ref}`errata <lbl>`: n")


def test_a_pipe_in_a_description_does_not_split_the_row(monkeypatch):
    monkeypatch.setattr(eq, "EQUATIONS", (
        eq.Equation("ws", 1, "a", "the norm ||g||", eq.NOT_IMPLEMENTED, ("tests/t.py::test_a",),
                    note="r | s", untagged="u"),))
    row = eq.table("ws", []).splitlines()[2]
    cells = _cells(row)
    assert len(cells) == 6, row
    assert cells[2] == r"the norm \|\|g\|\|" and cells[5].endswith(r"r \| s"), cells


def test_a_papers_equations_come_in_number_order(monkeypatch):
    monkeypatch.setattr(eq, "EQUATIONS", tuple(reversed(eq.EQUATIONS)))
    assert [e.number for e in eq.equations("gg")] == list(range(1, 8))
    assert eq.registry_problems(eq.scan().tags) == []


@pytest.mark.parametrize("call", [eq.equations, eq.coverage, eq.coverage_line,
                                  lambda p: eq.table(p, [])])
def test_an_unknown_paper_is_refused_by_name(call):
    """A misspelt key ("SNJ" for "snj") would build an empty table, a paper with no
    equations; it is refused with the keys that exist."""
    with pytest.raises(ValueError, match=r"paper must be one of snj, snd, ws, gg; got 'SNJ'"):
        call("SNJ")
