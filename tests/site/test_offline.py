"""The built site loads no script or stylesheet from the network (moved here from
tests/test_lessons.py so that it runs after the build; docs/conf.py makes the same check at
the end of every build)."""

from __future__ import annotations

import re

REMOTE = re.compile(r"<(?:script|link)\b[^>]*\b(?:src|href)=[\"'](?:https?:)?//", re.I)


def test_built_html_loads_nothing_from_the_network(site):
    pages = sorted(site.rglob("*.html"))
    bad = [f"{p.relative_to(site)}: {m}" for p in pages for m in REMOTE.findall(p.read_text())]
    assert not bad, bad[:10]
    math_pages = [p for p in pages if "mathjax" in p.read_text()]
    assert math_pages, "no page loads MathJax: is the math rendered?"
    assert (site / "_static" / "mathjax" / "tex-chtml.js").exists()
