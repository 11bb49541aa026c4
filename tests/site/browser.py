"""Open built documentation pages in headless Chromium and report what a reader would see.

Used by ``tests/site/test_browser.py`` (after the Sphinx build in ``./test.sh``) and runnable
on its own to look at a build::

    .venv/bin/python -m tests.site.browser docs/_build/html [PAGE.html ...]

Debian's ``chromium`` and ``chromium-driver`` packages are driven by Selenium, with the driver
and browser named explicitly so that Selenium never looks for (or downloads) its own.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

WIDTH, HEIGHT = 1280, 900
CHROMIUM = ("chromium", "chromium-browser")
CHROMEDRIVER = ("chromedriver", "chromium-driver")
# Without these, Chromium on a machine with no network stalls on its background services.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1",
         # no other host resolves: a page that asks one for anything (a stylesheet's @import, a
         # font, a MathJax component) logs the failed request as a console error, whether or
         # not the machine running the tests has a network
         "--host-resolver-rules=MAP * ~NOTFOUND")
SCRIPT_TIMEOUT_S = 60  # an upper bound on MathJax typesetting one page, never a wait by itself
MAX_SHOT_HEIGHT = 16000  # px: a full page longer than this is cut (Chromium's texture limit)


def find_browser() -> tuple[str, str] | str:
    """``(chromium, chromedriver)`` paths, or a sentence saying what is missing."""
    browser = next((p for p in map(shutil.which, CHROMIUM) if p), None)
    driver = next((p for p in map(shutil.which, CHROMEDRIVER) if p), None)
    missing = [name for name, path in (("chromium", browser), ("chromium-driver", driver))
               if path is None]
    if missing:
        return (f"{' and '.join(missing)} not installed (Debian: apt-get install -y chromium "
                "chromium-driver; ./test.sh installs them)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed (pip install -e '.[docs]')"
    assert browser is not None and driver is not None
    return browser, driver


@contextmanager
def chromium(width: int = WIDTH, height: int = HEIGHT) -> Iterator:
    """A Selenium Chrome driver on Debian's Chromium, with a fresh profile; closed on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_browser()
    if isinstance(found, str):
        raise RuntimeError(found)
    browser, driver_path = found
    profile = tempfile.mkdtemp(prefix="refnorm-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.set_script_timeout(SCRIPT_TIMEOUT_S)
        driver.set_page_load_timeout(SCRIPT_TIMEOUT_S)
        # the viewport, not the window, is what the pages are laid out in
        inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
        driver.set_window_size(2 * width - inner[0], 2 * height - inner[1])
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@dataclass
class Page:
    """What one page showed: every list empty means the page is fine."""

    path: str
    console_errors: list[str] = field(default_factory=list)
    raw_math: list[str] = field(default_factory=list)
    math_errors: list[str] = field(default_factory=list)
    stray_escapes: list[str] = field(default_factory=list)
    clipped_pre: list[str] = field(default_factory=list)
    overflowing: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    empty_cells: list[str] = field(default_factory=list)
    shown_results: list[str] = field(default_factory=list)
    math_count: int = 0
    article_width: float = 0.0
    pre_chars: int = 0

    def problems(self) -> list[str]:
        out = []
        for name in ("console_errors", "raw_math", "math_errors", "stray_escapes", "clipped_pre",
                     "overflowing", "broken_images", "shown_results"):
            out += [f"{self.path}: {name.replace('_', ' ')}: {item}"
                    for item in getattr(self, name)]
        return out


# Runs in the page once MathJax (if the page loads it) has typeset everything.
INSPECT = r"""
const out = {rawMath: [], mathErrors: [], strayEscapes: [], clippedPre: [], overflowing: [],
             brokenImages: [], images: [], links: [], ids: [], emptyCells: [], shownResults: [],
             mathCount: 0, articleWidth: 0, preChars: 0};
const short = (s) => s.replace(/\s+/g, ' ').trim().slice(0, 100);
// math: every Sphinx math element holds a MathJax rendering, no TeX source left as text
for (const el of document.querySelectorAll('.math')) {
  out.mathCount += 1;
  if (!el.querySelector('mjx-container')) out.rawMath.push(short(el.textContent));
}
for (const el of document.querySelectorAll('mjx-merror, [data-mjx-error]'))
  out.mathErrors.push(short(el.getAttribute('data-mjx-error') || el.textContent));
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
for (let n = walker.nextNode(); n; n = walker.nextNode()) {
  const p = n.parentElement;
  if (!p || p.closest('pre, code, script, style, textarea, mjx-container, .highlight')) continue;
  if (getComputedStyle(p).display === 'none') continue;
  const m = n.textContent.match(/\$\$|\\\(|\\\)|\\\[|\\\]|\\begin\{/);
  if (m) out.rawMath.push(short(n.textContent));
}
// an inline literal shows its text as written: no reST escape left in it (\*spatial)
for (const el of document.querySelectorAll('code')) {
  const text = el.textContent;
  if (!el.closest('pre') && /\\[*_`]/.test(text)) out.strayEscapes.push(short(text));
}
// code: a <pre> that needs a horizontal scrollbar is clipped
const visible = (el) => el.getClientRects().length > 0;
for (const pre of document.querySelectorAll('pre')) {
  if (!visible(pre)) continue;
  if (pre.scrollWidth > pre.clientWidth + 1) {
    const line = pre.textContent.split('\n').reduce((a, b) => b.length > a.length ? b : a, '');
    out.clippedPre.push(`${pre.scrollWidth}px in ${pre.clientWidth}px: ${short(line)}`);
  }
}
// the width a code line gets, measured in characters of the code font
const probe = document.querySelector('article pre, main pre, pre');
if (probe) {
  const s = document.createElement('span');
  s.textContent = 'x'.repeat(100);
  probe.appendChild(s);
  const cs = getComputedStyle(probe);
  const inner = probe.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
  out.preChars = Math.floor(inner / (s.getBoundingClientRect().width / 100));
  s.remove();
}
const article = document.querySelector('article, [role=main], .body');
if (article) out.articleWidth = article.getBoundingClientRect().width;
// nothing but scrolling containers may stick out of the page or its column
const root = document.documentElement;
if (root.scrollWidth > root.clientWidth + 1)
  out.overflowing.push(`the page scrolls sideways: ${root.scrollWidth}px in ${root.clientWidth}px`);
const scrolls = (el) => {
  for (let a = el.parentElement; a && a !== document.body; a = a.parentElement) {
    const ox = getComputedStyle(a).overflowX;
    if (ox === 'auto' || ox === 'scroll') return a;
  }
  return null;
};
const wide = 'table, img, svg:not(mjx-container svg), video, iframe, mjx-container[display=true]';
for (const el of document.querySelectorAll(wide)) {
  if (!visible(el)) continue;
  const box = el.getBoundingClientRect();
  const holder = scrolls(el);
  const column = (holder || el.closest('article, [role=main], .body') || document.body)
      .getBoundingClientRect();
  if (!holder && box.right > column.right + 1)
    out.overflowing.push(`<${el.tagName.toLowerCase()}> ${Math.round(box.width)}px wide ` +
                         `sticks out of its column by ${Math.round(box.right - column.right)}px: ` +
                         short(el.getAttribute('src') || el.textContent || ''));
}
// a table in a scrolling holder that is wider than it hides its last columns to the side
for (const t of document.querySelectorAll('article table')) {
  const holder = scrolls(t);
  if (visible(t) && holder && t.scrollWidth > holder.clientWidth + 1)
    out.overflowing.push(`a table ${t.scrollWidth}px wide scrolls in ${holder.clientWidth}px: ` +
                         short(t.querySelector('tr') ? t.querySelector('tr').textContent : ''));
}
// a formula box that scrolls must hold a formula wider than it (MathJax's hidden MathML copy
// once made fitting formulas scroll, with a scrollbar under each)
for (const c of document.querySelectorAll('mjx-container')) {
  const m = c.querySelector(':scope > mjx-math');
  if (!m || !visible(c) || getComputedStyle(c).overflowX === 'visible') continue;
  if (c.scrollWidth > c.clientWidth + 1 && m.getBoundingClientRect().width <= c.clientWidth + 1)
    out.overflowing.push(`a formula that fits its ${c.clientWidth}px box scrolls: ` +
                         short(c.textContent));
  // a display formula wider than the column needs sideways scrolling: break its lines
  if (c.getAttribute('display') === 'true' && m.getBoundingClientRect().width > c.clientWidth + 1)
    out.overflowing.push(`a display formula ${Math.round(m.getBoundingClientRect().width)}px ` +
                         `wide scrolls in ${c.clientWidth}px: ${short(c.textContent)}`);
}
// a lesson's check prints its verdict; nothing more may follow it (its result, all arrays)
for (const cell of document.querySelectorAll('.cell_output')) {
  const verdict = [...cell.querySelectorAll('.output.stream')]
      .some((o) => /exercise \S+( \(check [^)]*\))? passed/.test(o.textContent));
  if (verdict && cell.querySelector('.output.text_plain, .output.text_html'))
    out.shownResults.push(short(cell.textContent));
}
// nor out of the sidebars: a navigation entry that runs past the sidebar's edge is cut off
for (const bar of document.querySelectorAll('.bd-sidebar-primary, .bd-sidebar-secondary')) {
  if (!visible(bar)) continue;
  const edge = bar.getBoundingClientRect().right;
  for (const a of bar.querySelectorAll('a')) {
    const text = document.createRange();
    text.selectNodeContents(a);
    if (visible(a) && text.getBoundingClientRect().right > edge + 1)
      out.overflowing.push(`sidebar entry runs past the sidebar's edge: ${short(a.textContent)}`);
  }
}
for (const img of document.images) {
  out.images.push(img.getAttribute('src'));
  if (!img.complete || img.naturalWidth === 0) out.brokenImages.push(img.getAttribute('src'));
}
for (const a of document.querySelectorAll('a[href]')) out.links.push(a.href);
// table cells that show nothing (no text, no image, no math)
for (const cell of document.querySelectorAll('article td, article th')) {
  if (!cell.textContent.trim() && !cell.querySelector('img, svg, mjx-container')) {
    const row = cell.closest('tr');
    out.emptyCells.push(`column ${cell.cellIndex + 1} of the row "${short(row.textContent)}"`);
  }
}
for (const el of document.querySelectorAll('[id], a[name]')) out.ids.push(el.id || el.name);
return out;
"""

WAIT_FOR_MATH = r"""
const done = arguments[arguments.length - 1];
const mj = window.MathJax;
if (!document.querySelector('script[src*="mathjax"]')) { done('none'); return; }
const wait = () => {
  const m = window.MathJax;
  if (m && m.startup && m.startup.promise) {
    m.startup.promise.then(() => done('typeset'), (e) => done('error: ' + e));
  } else {
    window.addEventListener('load', wait, {once: true});
  }
};
if (document.readyState === 'complete' && !(mj && mj.startup)) done('mathjax did not load');
else wait();
"""


def inspect(driver, root: Path, page: Path, screenshots: Path | None = None) -> Page:
    """Load ``page`` (under the built site ``root``) and report on it; save a screenshot."""
    rel = page.relative_to(root).as_posix()
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(page.resolve().as_uri())
    state = driver.execute_async_script(WAIT_FOR_MATH)
    data = driver.execute_script(INSPECT)
    report = Page(rel, raw_math=data["rawMath"], math_errors=data["mathErrors"],
                  stray_escapes=data["strayEscapes"],
                  clipped_pre=data["clippedPre"], overflowing=data["overflowing"],
                  broken_images=data["brokenImages"], images=data["images"], links=data["links"],
                  ids=set(data["ids"]), empty_cells=data["emptyCells"],
                  shown_results=data["shownResults"],
                  math_count=data["mathCount"], article_width=data["articleWidth"],
                  pre_chars=data["preChars"])
    if state not in ("none", "typeset"):
        report.math_errors.append(f"MathJax: {state}")
    report.console_errors = [f"{e['level']}: {e['message']}" for e in driver.get_log("browser")
                             if e["level"] in ("SEVERE", "ERROR")]
    if screenshots is not None:
        shot = screenshots / (rel[: -len(".html")] + ".png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        shot.write_bytes(full_page_png(driver))
    return report


# Resolves once every image is decoded and two frames have been drawn since.
PAINTED = r"""
const done = arguments[arguments.length - 1];
Promise.all([...document.images].map((img) => img.decode().catch(() => null)))
  .then(() => requestAnimationFrame(() => requestAnimationFrame(() => done(true))));
"""


def full_page_png(driver) -> bytes:
    """A screenshot of the page at the viewport's width, from the top: all of it, or its
    first MAX_SHOT_HEIGHT px (the longest lessons are longer; a taller capture comes out
    garbled in this Chromium).

    The page is laid out once more in a viewport as tall as the capture (device metrics), so
    the sticky sidebars are drawn where a reader sees them at the top, then the viewport
    returns.
    """
    width, height = driver.execute_script(
        "return [document.documentElement.clientWidth, document.documentElement.scrollHeight]")
    height = min(height, MAX_SHOT_HEIGHT)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    try:
        driver.execute_script("window.scrollTo(0, 0)")
        driver.execute_async_script(PAINTED)
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "clip": {"x": 0, "y": 0, "width": width, "height": height,
                                      "scale": 1}})
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return base64.b64decode(shot["data"])


def broken_links(root: Path, pages: list[Page]) -> list[str]:
    """Every internal link of ``pages`` whose file is missing or whose #fragment has no target."""
    ids = {(root / p.path).resolve(): p.ids for p in pages}
    bad = []
    for page in pages:
        for href in page.links:
            url = urlsplit(href)
            if url.scheme != "file":
                continue
            target = Path(unquote(url.path))
            if not target.exists():
                shown = (target.relative_to(root.resolve())
                         if target.is_relative_to(root.resolve()) else href)
                bad.append(f"{page.path}: link to a missing file {shown}")
            elif url.fragment and target in ids and unquote(url.fragment) not in ids[target]:
                bad.append(f"{page.path}: link to a missing anchor {href.split('/')[-1]}")
    return bad


def pages_of(root: Path) -> list[Path]:
    """The built site's pages (HTML files outside ``_static``, ``_sources`` and ``_images``)."""
    skip = {"_static", "_sources", "_images", "_downloads", ".doctrees"}
    return sorted(p for p in root.rglob("*.html") if not skip & set(p.relative_to(root).parts))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    root = Path(args[0] if args else "docs/_build/html")
    pages = [root / a for a in args[1:]] or pages_of(root)
    shots = Path(os.environ.get("REFNORM_SCREENSHOTS", root.parent / "screenshots"))
    reports = []
    with chromium() as driver:
        for page in pages:
            r = inspect(driver, root, page, shots)
            reports.append(r)
            print(json.dumps({"page": r.path, "article_px": round(r.article_width),
                              "pre_chars": r.pre_chars, "math": r.math_count,
                              "problems": r.problems()}, indent=None))
    for line in broken_links(root, reports):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
