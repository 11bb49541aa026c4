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
import sys
import types
from pathlib import Path

DOCS = Path(__file__).resolve().parent
LESSONS_SRC = DOCS.parent / "lessons"
LESSONS_DST = DOCS / "lessons"
STUDENT_DST = LESSONS_DST / "student"  # git-ignored with docs/lessons/


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


def write_student_copies(dst: Path = STUDENT_DST) -> None:
    """Write each lesson's student copy into ``dst`` as ``<lesson>_student.ipynb``.

    The copies are what ``refnorm lessons --student DIR`` writes (every solution blanked,
    outputs cleared); the suffix keeps a downloaded student copy from taking the name of the
    downloaded lesson. Each lesson page offers both (:func:`add_lesson_downloads`).
    """
    import contextlib
    import io
    import tempfile

    from refnorm.lessons import main as refnorm_lessons

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        status = refnorm_lessons(["--student", tmp, "--source", str(LESSONS_SRC)])
        if status != 0:
            raise RuntimeError(f"refnorm lessons --student {tmp} exited with {status}")
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        for path in sorted(Path(tmp).glob("*.ipynb")):
            shutil.copyfile(path, dst / f"{path.stem}_student.ipynb")


sync_lessons()
write_student_copies()

# autosummary imports every submodule to list it; refnorm/__main__.py would run the CLI.
sys.modules.setdefault("refnorm.__main__", types.ModuleType("refnorm.__main__"))

# -- Project -----------------------------------------------------------------------------------

project = "refnorm"
author = "refnorm contributors"
copyright = "refnorm contributors"
release = "0.1.0"

# -- General -----------------------------------------------------------------------------------

extensions = [
    "myst_nb",                   # myst-nb brings myst-parser; it registers .md and .ipynb sources
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",       # the docstrings are numpydoc
    "sphinx-mathjax-offline",    # MathJax 3 copied into _static/mathjax: math with no network
]

exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store", "images",
                    "lessons/student"]  # downloads, not pages
templates_path = ["_templates"]

# -- API reference -------------------------------------------------------------------------------
# api.md lists the public modules with autosummary (:recursive:); _templates/autosummary/module.rst
# documents each module's own members. A {func}, {class}, {meth} or {mod} role that does not
# resolve is a warning (nitpicky), so -W fails the build on it. Type annotations are not
# cross-referenced (numpy's ``Array`` alias, ``ModuleType``...): py:class misses are ignored.

autosummary_generate = True
autosummary_imported_members = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"            # signatures stay short; the numpydoc sections give types
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_ivar = True              # Attributes sections as fields, not second descriptions
napoleon_custom_sections = [("Learned parameters", "params_style")]  # the weight layers
nitpicky = True
nitpick_ignore_regex = [
    ("py:class", r".*"), ("py:obj", r".*"),      # annotations and napoleon's type fields
    ("py:(data|attr|exc)", r".*"),               # constants, attributes, napoleon's Raises text
    ("py:.*", r"(.*\.)?_[A-Za-z].*"),           # private helpers named in docstrings
    # refnorm.core re-exports the functions standardize and moments under the names of their
    # modules, so autosummary documents those pages as the functions and the module-relative
    # names below have no target (rename to fix: refnorm/core/__init__.py is not docs').
    ("py:func", r"standardize_backward|moments"),
    ("py:meth", r"finish"),                      # comm's module docstring, method of a class
    # refnorm/train/interrupt.py names the CLI's entry point, which lives in the module that
    # the stub below replaces (its import would run the CLI): no page documents it.
    ("py:func", r"refnorm\.__main__\.entry"),
]


def _lookup(dotted):
    """The object a dotted name imports to (module prefix, then attributes), or None."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def resolve_reexports(app, env, node, contnode):
    """Resolve a Python role through re-exports and the current module.

    ``refnorm.batch_average`` is documented where it is defined,
    ``refnorm.inference.batch_average``; a role written with the short or re-exported name
    (or a bare name in a docstring of the module that imports it) finds it here. A closure
    (``<locals>`` in its name) has no page: the role then renders as plain code.
    """
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    context = [c for c in (node.get("py:module"), node.get("py:class")) if c]
    candidates = [target]
    if node.get("py:module"):
        candidates.append(f"{node.get('py:module')}.{target}")
    if len(context) == 2:
        candidates.append(".".join(context) + f".{target}")
    domain = env.get_domain("py")
    for name in candidates:
        if not name.startswith("refnorm"):
            continue
        obj = _lookup(name)
        if obj is None:
            continue
        if isinstance(obj, types.ModuleType):
            canonical = obj.__name__
        elif hasattr(obj, "__qualname__") and hasattr(obj, "__module__"):
            canonical = f"{obj.__module__}.{obj.__qualname__}"
        else:
            continue
        if "<locals>" in canonical:
            return contnode
        new = node.deepcopy()
        new["reftarget"] = canonical
        found = domain.resolve_xref(env, node.get("refdoc"), app.builder, node["reftype"],
                                    canonical, new, contnode)
        if found is not None:
            return found
    return None


def check_offline(app, exc):
    """Fail the build if a page loads a script or stylesheet from the network.

    The math is rendered by the MathJax copy in ``_static/mathjax``; this makes sure no theme
    or extension added a CDN source (``tests/test_lessons.py`` checks the same on the output).
    """
    import re

    if exc is not None or app.builder.format != "html":
        return
    pattern = re.compile(r"<(?:script|link)\b[^>]*\b(?:src|href)=[\"'](?:https?:)?//", re.I)
    bad = []
    for page in Path(app.outdir).rglob("*.html"):
        for tag in pattern.findall(page.read_text(encoding="utf-8")):
            bad.append(f"{page.relative_to(app.outdir)}: {tag}")
    if bad:
        raise RuntimeError("pages load remote scripts or stylesheets:\n" + "\n".join(bad[:20]))


def escape_shapes(app, what, name, obj, options, lines):
    """Escape the star of shapes such as ``(N, C, *spatial)`` (reST would read it as emphasis).

    The docstrings are written to be read as plain text too; only a ``*`` that starts a word
    and has no closing ``*`` on the line is escaped, outside double-backquoted literals
    (also those that go on over a line break, within a paragraph).
    """
    import re

    star = re.compile(r"(?<![\\*\w`])\*(?=[A-Za-z_])(?![^*]*\*(?!\w))")
    table = any(re.fullmatch(r"\s*=+(\s+=+)+\s*", line) for line in lines)
    in_literal = False  # a ``literal`` opened on an earlier line of the paragraph
    for i, line in enumerate(lines):
        if not line.strip():
            in_literal = False
        parts = line.split("``")
        outside = slice(1 if in_literal else 0, None, 2)
        # in a simple table a backslash would shift the columns: use U+2217 (same width)
        parts[outside] = [star.sub("\u2217" if table else r"\\*", part)
                          for part in parts[outside]]
        lines[i] = "``".join(parts)
        in_literal ^= len(parts) % 2 == 0


_SECTIONS = {"parameters", "attributes", "other parameters", "returns", "yields", "raises",
             "learned parameters"}


def close_sections(app, what, name, obj, options, lines):
    """Give trailing prose its own ``Notes`` header, before napoleon reads the docstring.

    numpydoc ends a section only at the next header; several docstrings continue with a
    plain paragraph after ``Parameters``, which napoleon would read as more parameters. An
    unknown underlined header (``Learned parameters``) becomes a rubric.
    """
    import re

    entry = re.compile(r"^\*{0,2}\w+(, \*{0,2}\w+)*( : .*)?$")
    section, out = None, []
    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if line and not line[0].isspace() and re.fullmatch(r"-{3,}", nxt.strip()):
            section = line.strip().lower()
            if section not in _SECTIONS | {"notes", "examples", "see also", "references"}:
                out += [f".. rubric:: {line.strip()}", ""]
                lines[i + 1] = ""
                section = "rubric"
                continue
        elif (section in _SECTIONS and line and not line[0].isspace() and out and out[-1] == ""
              and not entry.match(line) and not re.fullmatch(r"-{3,}", line.strip())):
            out += ["Notes", "-----"]
            section = "notes"
        out.append(line)
    lines[:] = out


DOWNLOADS_TITLE = "Run this lesson yourself"


def add_lesson_downloads(app, doctree):
    """Put the lesson's two notebooks, and how to open them, under each lesson's title.

    The links are Sphinx download references (the files are copied to ``_downloads/``): the
    lesson as in ``lessons/`` (solutions filled in) and its student copy from
    :func:`write_student_copies`. Runs before Sphinx collects download references.
    """
    from docutils import nodes
    from sphinx import addnodes

    docname = app.env.docname
    if not docname.startswith("lessons/"):
        return
    name = docname.split("/", 1)[1]

    def download(target: str) -> addnodes.download_reference:
        ref = addnodes.download_reference("", "", refdoc=docname, reftarget=target,
                                          refexplicit=True, refdomain="", reftype="download")
        ref += nodes.literal(Path(target).name, Path(target).name)
        return ref

    solved, student = download(f"/lessons/{name}.ipynb"), download(
        f"/lessons/student/{name}_student.ipynb")
    intro = nodes.paragraph()
    intro += [nodes.Text("Download the lesson, "), solved,
              nodes.Text(" (solutions filled in: the notebook this page was executed from), "
                         "or its student copy, "), student,
              nodes.Text(" (every exercise a blank whose check cell fails until you fill it "
                         "in; "),
              nodes.literal("refnorm lessons --student DIR", "refnorm lessons --student DIR"),
              nodes.Text(" writes the same copies).")]
    setup_cmd = "python3 -m venv .venv && .venv/bin/pip install -e '.[lessons]'"
    open_cmd = f".venv/bin/jupyter lab path/to/{name}_student.ipynb"
    how = nodes.paragraph()
    how += [nodes.Text("To open either in JupyterLab, install refnorm with its lessons extra: in "
                       "a clone of refnorm, "), nodes.literal(setup_cmd, setup_cmd),
            nodes.Text(" (or "), nodes.literal("./test.sh", "./test.sh"),
            nodes.Text(", which sets up the same "), nodes.literal(".venv", ".venv"),
            nodes.Text(" and runs the tests). Then "), nodes.literal(open_cmd, open_cmd),
            nodes.Text(" opens the notebook; run its cells from the top.")]
    box = nodes.admonition(classes=["tip", "lesson-downloads"])
    box += nodes.title(DOWNLOADS_TITLE, DOWNLOADS_TITLE)
    box += [intro, how]
    section = next(iter(doctree.findall(nodes.section)), None)
    if section is None:
        raise ValueError(f"{docname}: a lesson needs a title to put its downloads under")
    title = section.next_node(nodes.title)
    section.insert(section.index(title) + 1, box)


def setup(app):
    app.connect("doctree-read", add_lesson_downloads, priority=400)  # before the collector
    app.connect("autodoc-process-docstring", close_sections, priority=400)
    app.connect("autodoc-process-docstring", escape_shapes)
    app.connect("missing-reference", resolve_reexports)
    app.connect("build-finished", check_offline, priority=900)  # after MathJax is copied

# -- MyST --------------------------------------------------------------------------------------

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]

# -- Notebook execution (myst-nb) ---------------------------------------------------------------

nb_execution_mode = "force"           # run every notebook on every build, no cache
nb_execution_raise_on_error = True    # an exception in a lesson fails the build
nb_execution_timeout = 300            # seconds per cell
nb_execution_show_tb = True           # print the traceback in the build log
nb_render_markdown_format = "myst"    # text/markdown outputs (the errata tables) as MyST
nb_ipywidgets_js: dict = {}           # no widget scripts from a CDN (the lessons have no widgets)

# -- HTML --------------------------------------------------------------------------------------

# sphinx-book-theme (Jupyter Book's theme; tried beside pydata-sphinx-theme, see the commit
# that chose it): the whole course in the left sidebar, the lessons as one part, the page's
# outline on the right, light and dark modes, Sphinx's own search (searchindex.js, no
# network). Its launch buttons (Binder, Colab...) stay off: they need a repository online.

html_theme = "sphinx_book_theme"
html_title = "refnorm"
html_static_path = ["_static"]
html_css_files = ["refnorm.css"]      # wide code, outputs that wrap, tables that scroll
html_context = {"default_mode": "auto"}  # light or dark as the reader's system says
html_theme_options = {
    "home_page_in_toc": True,
    "show_toc_level": 2,              # the page outline on the right: sections and subsections
    "show_navbar_depth": 1,
    "use_download_button": True,      # the page's source (.ipynb for a lesson) and print-to-PDF
    "use_fullscreen_button": False,
    "navigation_with_keys": False,
    "navbar_persistent": [],          # the sidebar holds the search field
    "footer_content_items": ["copyright"],
}
html_copy_source = True               # _sources/: what the download button serves
html_show_search_summary = False      # the search lists pages by title: the summaries are
                                      # fetched from the pages, which a file:// page may not
