"""The built documentation (``docs/_build/html``), opened in a real browser.

These tests need the site built first: ``./test.sh`` runs them right after its Sphinx build
(and leaves them out of its first pytest run). Anywhere else they skip with the reason: no
build, or no Chromium, chromium-driver or Selenium. With ``REFNORM_REQUIRE_BROWSER=1`` (set
by ``./test.sh``, which installs Debian's ``chromium`` and ``chromium-driver`` when missing)
a missing browser fails them instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.site import browser

ROOT = Path(__file__).resolve().parents[2]
HTML = ROOT / "docs" / "_build" / "html"
SCREENSHOTS = ROOT / "docs" / "_build" / "screenshots"


@pytest.fixture(scope="session")
def site() -> Path:
    """The built site's folder; skips when it has not been built."""
    if not (HTML / "index.html").exists():
        pytest.skip("docs/_build/html not built (./test.sh builds it, then runs tests/site)")
    return HTML


@pytest.fixture(scope="session")
def driver(site):
    """One headless Chromium for the session (skipped or failed without one, see above)."""
    found = browser.find_browser()
    if isinstance(found, str):
        if os.environ.get("REFNORM_REQUIRE_BROWSER") == "1":
            pytest.fail(f"REFNORM_REQUIRE_BROWSER=1 but {found}")
        pytest.skip(found)
    with browser.chromium() as d:
        yield d


@pytest.fixture(scope="session")
def pages(site, driver) -> dict[str, browser.Page]:
    """Every built page, opened at 1280 x 900 and inspected; a screenshot of each is saved
    under docs/_build/screenshots/ (same path as the page, .png)."""
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    reports = {}
    for path in browser.pages_of(site):
        reports[path.relative_to(site).as_posix()] = browser.inspect(driver, site, path,
                                                                     SCREENSHOTS)
    return reports
