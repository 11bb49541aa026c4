"""Every built page in headless Chromium at 1280 px: what a reader of the course site sees.

Per page (the ``pages`` fixture opens each once and saves its screenshot): no console error,
every math element typeset by MathJax and no TeX source left in the text, no ``<pre>`` that
needs a scrollbar, nothing but scrolling containers wider than the column, every image
loaded, every internal link pointing at a file (and anchor) that exists. Then the promises
the pages make: the code column holds the lessons' line length, each lesson page offers its
two notebooks, the dark mode switches, the search works without a server or a network.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest

from refnorm import lessons
from tests.site import browser
from tests.site.conftest import ROOT, SCREENSHOTS

LESSONS = sorted((ROOT / "lessons").glob("*.ipynb"))


def _problems(pages, attribute: str) -> list[str]:
    return [f"{name}: {item}" for name, page in pages.items() for item in getattr(page, attribute)]


def test_every_page_is_opened(site, pages):
    for required in ("index.html", "api.html", "equations.html", "errata.html", "search.html",
                     "lessons/01_batch_norm.html", "api/refnorm.html"):
        assert required in pages, sorted(pages)[:20]
    assert {f"lessons/{p.stem}.html" for p in LESSONS} <= set(pages)
    assert len(pages) == len(browser.pages_of(site))


def test_no_console_errors(pages):
    assert not _problems(pages, "console_errors")


def test_math_is_typeset_everywhere(pages):
    assert not _problems(pages, "raw_math")
    assert not _problems(pages, "math_errors")
    # the check saw math where there is math: the errata page and lesson 01 are full of it
    assert pages["errata.html"].math_count > 20
    assert pages["equations.html"].math_count > 100
    assert pages["lessons/01_batch_norm.html"].math_count > 20


def test_no_escape_is_left_in_inline_code(pages):
    assert not _problems(pages, "stray_escapes")


def test_no_code_block_is_clipped(pages):
    assert not _problems(pages, "clipped_pre")


def test_nothing_is_wider_than_its_column(pages):
    assert not _problems(pages, "overflowing")


def test_the_equation_and_errata_tables_have_no_empty_cell(pages):
    assert pages["equations.html"].empty_cells == []
    assert pages["errata.html"].empty_cells == []


def test_every_equation_row_has_its_anchor(pages):
    # lessons link rows as equations.html#eq-<paper>-<n>
    from refnorm.errata.equations import EQUATIONS

    missing = {e.anchor for e in EQUATIONS} - pages["equations.html"].ids
    assert not missing, sorted(missing)


def test_every_image_loads(pages):
    assert not _problems(pages, "broken_images")
    assert any("_images/" in src for page in pages.values() for src in page.images)


def test_every_internal_link_resolves(site, pages):
    assert not browser.broken_links(site, list(pages.values()))
    assert sum(len(p.links) for p in pages.values()) > 1000  # the check saw the links


def test_one_screenshot_per_page(pages):
    for name in pages:
        shot = SCREENSHOTS / (name[: -len(".html")] + ".png")
        head = shot.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n", shot
        width, height = struct.unpack(">II", head[16:24])
        assert width == browser.WIDTH and height >= browser.HEIGHT // 2, (shot, width, height)


def test_the_code_column_holds_the_lessons_line_length(pages):
    # docs/_static/refnorm.css promises the column fits lessons/ruff.toml's line length.
    config = (ROOT / "lessons" / "ruff.toml").read_text(encoding="utf-8")
    limit = int(re.search(r"^line-length = (\d+)$", config, re.M).group(1))
    for p in LESSONS:
        chars = pages[f"lessons/{p.stem}.html"].pre_chars
        assert chars >= limit, f"{p.stem}: {chars} characters of code fit, the lessons use {limit}"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_lesson_page_offers_its_notebook_and_student_copy(site, pages, path):
    page = pages[f"lessons/{path.stem}.html"]
    downloads = {Path(link).name: Path(link.removeprefix("file://")) for link in page.links
                 if "/_downloads/" in link}
    solved, student = downloads[path.name], downloads[f"{path.stem}_student.ipynb"]
    assert solved.read_bytes() == path.read_bytes()
    original = json.loads(path.read_text(encoding="utf-8"))["cells"]
    copy = json.loads(student.read_text(encoding="utf-8"))["cells"]
    assert len(copy) == len(original)
    for a, b in zip(original, copy, strict=True):
        if "solution" in lessons.tags(a):
            exercise, task = lessons.exercise_title("".join(a["source"]))
            assert "BEGIN SOLUTION" not in "".join(b["source"])
            assert f"exercise {exercise}: {task}" in "".join(b["source"])
        if b["cell_type"] == "code":
            assert b["outputs"] == []
    html = (site / "lessons" / f"{path.stem}.html").read_text(encoding="utf-8")
    box = html[html.index("Run this lesson yourself"):]
    box = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", box[: box.index("</div>")]))
    assert f".venv/bin/jupyter lab path/to/{path.stem}_student.ipynb" in box, box
    article = html[html.index("<article"):]
    assert article.index("<h1") < article.index("Run this lesson yourself") < article.index("<h2")


def test_the_jupyterlab_command_the_lesson_pages_give_works():
    # the pages say: pip install -e '.[lessons]', then .venv/bin/jupyter lab NOTEBOOK
    assert re.search(r'^lessons = \[[^]]*"jupyterlab', (ROOT / "pyproject.toml").read_text(),
                     re.M | re.S)
    jupyter = Path(sys.executable).parent / "jupyter"
    if not jupyter.exists():
        pytest.skip(f"{jupyter} not installed (the lessons extra installs it)")
    done = subprocess.run([str(jupyter), "lab", "--version"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0 and re.match(r"\d+\.\d+", done.stdout), done


def test_dark_mode_switches_the_colours(site, driver):
    driver.get((site / "index.html").as_uri())
    mode = "return document.documentElement.dataset.theme"
    background = "return getComputedStyle(document.body).backgroundColor"
    assert driver.execute_script(mode) == "light"  # headless Chromium prefers light
    light = driver.execute_script(background)
    # as a reader does it: the colour-mode button in the page header, then "Dark" in its menu
    driver.find_element("css selector", "button.theme-switch-button").click()
    driver.find_element("css selector", "button.theme-change-button[data-mode=dark]").click()
    assert driver.execute_script(mode) == "dark"
    driver.find_element("css selector", "article").click()  # the menu closes
    dark = driver.execute_script(background)

    def luminance(css: str) -> float:
        r, g, b = (int(v) for v in re.findall(r"\d+", css)[:3])
        return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255

    assert luminance(light) > 0.9 and luminance(dark) < 0.15, (light, dark)
    shot = SCREENSHOTS / "dark" / "index.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    shot.write_bytes(browser.full_page_png(driver))
    driver.execute_script("localStorage.clear()")


def test_search_finds_pages_offline(site, driver):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get((site / "search.html").as_uri() + "?q=switchable")
    # Sphinx writes a summary ("Search finished, found N pages ...") once the search is done
    summary = "#search-results .search-summary"
    WebDriverWait(driver, browser.SCRIPT_TIMEOUT_S).until(
        lambda d: "Search finished" in " ".join(e.text for e in d.find_elements(
            "css selector", summary)))
    found = [a.get_attribute("href") for a in
             driver.find_elements("css selector", "#search-results ul.search li a")]
    assert any(href.endswith("lessons/03_switchable_norm.html") for href in found), found
    assert any(href.endswith("api/refnorm.norms.switchable_norm.html") for href in found), found
    assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


# Runs in a page laid out at a narrower window: the page itself never scrolls sideways, and a
# code block either fits its column or scrolls inside itself (the column holds fewer
# characters than the lessons' line length there).
NARROW = r"""
const out = [];
const root = document.documentElement;
if (root.scrollWidth > root.clientWidth + 1)
  out.push(`the page scrolls sideways: ${root.scrollWidth}px in ${root.clientWidth}px`);
const article = document.querySelector('article');
for (const pre of document.querySelectorAll('article pre')) {
  if (!pre.getClientRects().length) continue;
  const ox = getComputedStyle(pre).overflowX;
  if (pre.scrollWidth > pre.clientWidth + 1 && ox !== 'auto' && ox !== 'scroll')
    out.push(`a code block is cut: ${pre.textContent.trim().slice(0, 60)}`);
  if (pre.getBoundingClientRect().right > article.getBoundingClientRect().right + 1)
    out.push(`a code block sticks out of the column: ${pre.textContent.trim().slice(0, 60)}`);
}
return out;
"""


def _course_pages(site) -> list[Path]:
    """The course's pages: every page but the API's module pages, and its top page."""
    return [p for p in browser.pages_of(site) if not p.relative_to(site).as_posix()
            .startswith("api/")] + [site / "api" / "refnorm.html"]


@pytest.mark.parametrize("width, which", [(800, "course"), (600, "lessons"), (600, "course"),
                                          (390, "course")])
def test_code_fits_or_scrolls_in_a_narrower_window(site, driver, width, which):
    # at 600 px a lesson's code lines (up to lessons/ruff.toml's length) no longer fit; below
    # 768 px inline code may break inside a name (docs/_static/refnorm.css): long test names
    # and API links made the conventions, data-parallel, errata and API pages scroll sideways
    if which == "course":
        paths = _course_pages(site)
    else:
        paths = [site / "lessons" / f"{p.stem}.html" for p in LESSONS]
    metrics = {"width": width, "height": browser.HEIGHT, "deviceScaleFactor": 1,
               "mobile": False}
    problems = []
    try:
        for path in paths:
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
            driver.get(path.resolve().as_uri())
            driver.execute_async_script(browser.WAIT_FOR_MATH)
            assert driver.execute_script("return innerWidth") == width
            problems += [f"{path.relative_to(site)}: {p}" for p in driver.execute_script(NARROW)]
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert not problems


def test_api_reference_documents_every_public_name_and_no_private_one(site, pages):
    import refnorm

    api = {name: page for name, page in pages.items() if name.startswith("api/")}
    ids = set().union(*(page.ids for page in api.values()))
    missing = []
    for name in refnorm.__all__:
        obj = getattr(refnorm, name)
        if isinstance(obj, types.ModuleType):
            target = f"module-{obj.__name__}"
        else:
            target = f"{obj.__module__}.{obj.__qualname__}"
        if target not in ids:
            missing.append(f"refnorm.{name} ({target})")
    assert not missing
    private = sorted(i for i in ids if i.startswith(("refnorm.", "module-refnorm."))
                     and any(part.startswith("_") and not part.endswith("__")
                             for part in i.split(".")))
    private += sorted(name for name in api if any(
        part.startswith("_") for part in name.removesuffix(".html").split(".")))
    assert not private


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_lesson_page_shows_each_exercise_and_its_passed_check(site, driver, path):
    # the notebook's solution cells, in order, by their "# Exercise NN.M: task" first line
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    exercises = [lessons.exercise_title("".join(c["source"]))[0] for c in cells
                 if "solution" in lessons.tags(c)]
    assert exercises, path
    driver.get((site / "lessons" / f"{path.stem}.html").resolve().as_uri())
    shown = [e.text for e in driver.find_elements(
        "css selector", "div.cell.tag_solution div.cell_input pre") if e.is_displayed()]
    verdicts = " ".join(e.text for e in driver.find_elements(
        "css selector", "div.cell.tag_check div.cell_output") if e.is_displayed())
    assert [re.match(r"# Exercise (\S+):", text).group(1) for text in shown] == exercises
    for exercise in exercises:
        assert re.search(rf"exercise {re.escape(exercise)}( \(check [^)]*\))? passed",
                         verdicts), (exercise, verdicts[:300])


def test_the_browser_reaches_no_other_host(site, driver):
    # test_no_console_errors is the site's offline check: a request to another host fails
    # (browser.FLAGS) and the failure is a console error
    driver.get((site / "index.html").resolve().as_uri())
    driver.get_log("browser")
    state = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const link = document.createElement('link');
        link.rel = 'stylesheet';
        link.href = 'https://example.org/style.css';
        link.onload = () => done('loaded');
        link.onerror = () => done('failed');
        document.head.appendChild(link);
    """)
    assert state == "failed"
    assert any(e["level"] == "SEVERE" and "example.org" in e["message"]
               for e in driver.get_log("browser"))


def test_no_check_shows_a_result_after_its_verdict(pages):
    # a check cell prints "exercise NN.M passed: ..." (or "exercise NN.M (check k of n)
    # passed: ...") and nothing more: no returned dict of arrays under the verdict
    assert not _problems(pages, "shown_results")
