"""Sphinx configuration for the refnorm documentation.

Build (offline; warnings are errors):

    .venv/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

The lesson notebooks live in the top-level ``lessons/`` folder. They are copied into
``docs/lessons/`` (git-ignored) when this file is loaded, before Sphinx looks for sources, and
myst-nb executes every one of them top to bottom during the build. A lesson that raises fails
the build: this is the one place CI runs all the lessons.

With ``nb_execution_raise_on_error`` the failing cell's traceback is chained to the
``ExecutionError`` that stops the build; Sphinx prints it only with ``-T``
(``--show-traceback``), otherwise it goes to a ``/tmp/sphinx-err-*.log`` file. CI should pass
``-T`` so that a broken lesson's error appears in the log.
"""

from __future__ import annotations

import shutil
from pathlib import Path

DOCS = Path(__file__).resolve().parent
LESSONS_SRC = DOCS.parent / "lessons"
LESSONS_DST = DOCS / "lessons"


def sync_lessons(src: Path = LESSONS_SRC, dst: Path = LESSONS_DST) -> None:
    """Mirror ``src/*.ipynb`` into ``dst``: copy new or changed notebooks, drop stale ones.

    ``copy2`` keeps modification times, so Sphinx only re-reads (and re-executes) a lesson
    that actually changed when an incremental build is run.
    """
    dst.mkdir(exist_ok=True)
    wanted = {p.name: p for p in sorted(src.glob("*.ipynb"))}
    for old in dst.glob("*.ipynb"):
        if old.name not in wanted:
            old.unlink()
    for name, path in wanted.items():
        target = dst / name
        if (
            not target.exists()
            or target.stat().st_mtime_ns != path.stat().st_mtime_ns
            or target.stat().st_size != path.stat().st_size
        ):
            shutil.copy2(path, target)


sync_lessons()

# -- Project -----------------------------------------------------------------------------------

project = "refnorm"
author = "refnorm contributors"
copyright = "refnorm contributors"
release = "0.1.0"

# -- General -----------------------------------------------------------------------------------

extensions = ["myst_nb"]  # myst-nb brings myst-parser; it registers .md and .ipynb sources

exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store", "images"]

# -- MyST --------------------------------------------------------------------------------------

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]

# -- Notebook execution (myst-nb) ---------------------------------------------------------------

nb_execution_mode = "force"           # run every notebook on every build, no cache
nb_execution_raise_on_error = True    # an exception in a lesson fails the build
nb_execution_timeout = 300            # seconds per cell
nb_execution_show_tb = True           # print the traceback in the build log
nb_render_markdown_format = "myst"    # text/markdown outputs (the errata tables) as MyST

# -- HTML --------------------------------------------------------------------------------------

html_theme = "alabaster"
html_title = "refnorm"
html_static_path: list[str] = []
