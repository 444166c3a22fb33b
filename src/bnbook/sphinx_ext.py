"""The book's Sphinx extension (listed in ``_config.yml``): what every page carries about the book.

- **Version line** in the footer of every page: the package version, the build date and the
  commit (:func:`bnbook.publish.build_info`), the licences and a link to "How to cite".
- **Repository buttons** follow ``repository.url`` in ``_config.yml``: shown when it is set, off
  while it is empty.
- **Alt text**: an ``<img>`` whose PNG carries a description (:func:`bnbook.plots.describe`, written
  by :func:`bnbook.report.glue_figure` and :func:`bnbook.plots.save`) gets it as ``alt``, after a
  sentence saying what it shows: the ``:alt:`` of its directive, else its caption's first sentence.
- **Downloads that run**: a chapter's download menu offers its MyST source (``chapters/NN-slug.md``)
  with a note on how to install ``bnbook`` (:func:`bnbook.publish.runnable_source`) instead of the
  executed ``.ipynb``, and the whole book as a PDF when ``make pdf`` has written one.
- **Directive** ``{bnbook-citation}`` (``:format: bibtex`` or ``text``): the citation of this version.
- **Styles** (``bnbook.css``): display equations scroll instead of running over their numbers,
  and print settings for the PDF edition.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import html
import re
import shutil
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

from bnbook import plots, publish
from bnbook.paths import repo_root

CSS_NAME = "bnbook.css"

CSS = """\
/* bnbook.sphinx_ext: display equations never run over their numbers, and scroll when too wide. */
div.math {
  display: flex;
  flex-direction: row-reverse;   /* the number (first in the HTML) goes to the right */
  align-items: center;
  gap: 0.5em;
}
div.math > span.eqno {
  float: none;
  flex: 0 0 auto;
  order: 0;
}
div.math > mjx-container[display="true"], div.math > .MathJax {
  flex: 1 1 auto;
  min-width: 0;
  overflow-x: auto;
  overflow-y: hidden;
  margin: 0.5em 0 !important;
  padding: 0.2em 0;
}
/* Figures never wider than the column. */
figure img, .cell_output img { max-width: 100%; height: auto; }
.bnbook-build { font-size: 0.85em; margin-top: 0.5em; }

@media print {
  @page { size: A4; margin: 16mm 14mm; }
  html { font-size: 10.5pt; }
  /* every page of the single-page edition starts a new sheet; the site's chrome stays out */
  .bd-header-article, .header-article-items, .prev-next-area, .bd-sidebar-primary,
  .bd-sidebar-secondary, .bd-header, .skip-link, button.toggle-button, .headerlink { display: none !important; }
  span[id^="document-"] + section { break-before: page; }  /* each chapter of the single page */
  figure, div.math, table { break-inside: avoid; }
  pre { white-space: pre-wrap !important; overflow: visible !important; word-break: break-word; }
  div.highlight, .cell_output { overflow: visible !important; }
  details.hide.above-input, details.hide.below-input { display: none; }
  div.math > mjx-container[display="true"] { overflow: visible; }
}
"""


# ------------------------------------------------------------------ configuration
def _on_config(app: Sphinx, config: Any) -> None:
    root = repo_root()
    info = publish.build_info(root)
    config.version = config.release = info.version
    config.bnbook_build = dataclasses.asdict(info)
    # One setting for the repository: buttons only when it is set.
    opts = dict(config.html_theme_options or {})
    has_repo = bool(str(opts.get("repository_url") or "").strip())
    opts["use_repository_button"] = has_repo
    opts["use_issues_button"] = has_repo
    config.html_theme_options = opts
    substitutions = dict(getattr(config, "myst_substitutions", None) or {})
    substitutions.setdefault("version", info.version)
    config.myst_substitutions = substitutions
    if not config.bnbook_chapters:
        config.bnbook_chapters = str(root / "chapters")
    if not config.bnbook_pdf:
        config.bnbook_pdf = str(Path(app.srcdir).parent / "_build" / "pdf" / publish.PDF_NAME)
    pdf = Path(config.bnbook_pdf)
    # Pages are rewritten when a PDF edition appears or changes (an 'html' config value).
    config.bnbook_pdf_stamp = f"{pdf.stat().st_size}-{int(pdf.stat().st_mtime)}" if pdf.exists() else ""


def _meta(app: Sphinx) -> publish.BookMeta:
    import bnbook

    config = app.config
    url = str((config.html_theme_options or {}).get("repository_url") or "").strip()
    return publish.BookMeta(
        title=config.html_title or config.project, author=config.author, version=bnbook.__version__,
        released=_dt.date.fromisoformat(bnbook.RELEASE_DATE), repository=url,
    )


def _pdf(app: Sphinx) -> Path | None:
    pdf = Path(app.config.bnbook_pdf)
    return pdf if app.builder.name == "html" and pdf.exists() else None


def _chapter_source(app: Sphinx, docname: str) -> Path | None:
    """The MyST source of an executed chapter page, or ``None`` for other pages."""
    if not docname.startswith("chapters/"):
        return None
    source = Path(app.config.bnbook_chapters) / f"{Path(docname).name}.md"
    return source if source.exists() else None


# ------------------------------------------------------------------ alt text
def _set_alt_text(app: Sphinx, doctree: nodes.document) -> None:
    docname = app.env.docname
    for image in doctree.findall(nodes.image):
        uri = image.get("uri", "")
        if not uri.endswith(".png") or "://" in uri:
            continue
        # Sphinx's image collector has already made the path relative to the source folder.
        candidate = (image.get("candidates") or {}).get("*")
        path = Path(app.srcdir, candidate) if candidate else Path(app.env.relfn2path(uri, docname)[1])
        if not path.exists():
            continue
        description = plots.read_description(path) or ""
        # What it shows: the directive's :alt:, else the first sentence of the figure's caption;
        # then what it draws (a PNG from an older run has no description: the summary alone).
        summary = str(image.get("alt") or "").strip() or _caption_sentence(image)
        alt = f"{summary.rstrip('.')}. {description}" if summary and description else summary or description
        if alt:
            image["alt"] = alt


def _caption_sentence(image: nodes.image) -> str:
    """The first sentence of the caption of the figure holding ``image``, math as plain text."""
    figure = image.parent
    while figure is not None and not isinstance(figure, nodes.figure):
        figure = figure.parent
    captions = [c for c in figure.children if isinstance(c, nodes.caption)] if figure is not None else []
    if not captions:
        return ""
    parts: list[str] = []

    def walk(node: nodes.Node) -> None:
        if isinstance(node, nodes.math):
            parts.append(plots.plain_text(f"${node.astext()}$"))
        elif isinstance(node, nodes.Text):
            parts.append(node.astext())
        elif node.get("nb_element") == "mime_bundle" and node.children:
            # a glued value, one child per mime type (resolved later): read its rich form only
            rich = [c for c in node.children if c.get("mime_type") != "text/plain"] or node.children
            walk(rich[0])
        else:
            for child in node.children:
                walk(child)

    walk(captions[0])
    text = " ".join("".join(parts).split())
    return re.split(r"(?<=[.!?])\s+(?=[A-Z(])", text, maxsplit=1)[0]


# ------------------------------------------------------------------ page furniture
def _footer(app: Sphinx, pagename: str, context: dict[str, Any]) -> str:
    build = publish.BuildInfo(**app.config.bnbook_build)
    meta = _meta(app)
    pathto = context["pathto"]
    cite = f' <a href="{pathto("cite")}">How to cite</a>.' if "cite" in app.env.all_docs else ""
    repo = (f' Source: <a href="{html.escape(meta.repository)}">{html.escape(meta.repository)}</a>.'
            if meta.repository else "")
    return (
        f'<p class="bnbook-build"><em>{html.escape(meta.title)}</em>, {html.escape(build.line())}. '
        f"Text and figures: {publish.LICENSE_NAMES[publish.LICENSES['text']]} (CC BY 4.0); "
        f"code: {publish.LICENSES['code']} License.{cite}{repo}</p>"
    )


def _on_page(app: Sphinx, pagename: str, templatename: str, context: dict[str, Any], doctree: Any) -> None:
    context["theme_extra_footer"] = _footer(app, pagename, context)
    if app.builder.name == "singlehtml" and "body" in context:
        # The PDF edition prints no site footer: its first lines say which version it is.
        context["body"] = f'<div class="bnbook-edition">{context["theme_extra_footer"]}</div>' + context["body"]
    groups = [b for b in context.get("header_buttons", []) if b.get("label") == "download-buttons"]
    if not groups:
        return
    pathto = context["pathto"]
    buttons = list(groups[0]["buttons"])
    source = _chapter_source(app, pagename)
    if source is not None:  # the executed .ipynb is not runnable on its own: offer the source
        buttons = [b for b in buttons if b.get("label") not in ("download-notebook-button", "download-source-button")]
        buttons.insert(0, {
            "type": "link", "url": f"{pathto('_sources', 1)}/chapters/{source.name}", "text": ".md",
            "tooltip": "Download the chapter's MyST notebook (runs with the bnbook package)",
            "icon": "fas fa-code", "label": "download-source-button",
        })
    for b in buttons:
        if b.get("label") == "download-pdf-button":
            b["text"], b["tooltip"] = "print page", "Print this page (or save it as PDF)"
    if _pdf(app) is not None:
        buttons.append({
            "type": "link", "url": pathto(publish.PDF_NAME, 1), "text": "book .pdf",
            "tooltip": "Download the whole book as one PDF", "icon": "fas fa-book",
            "label": "download-book-pdf-button",
        })
    groups[0]["buttons"] = buttons


def _on_finished(app: Sphinx, exception: BaseException | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    out = Path(app.outdir)
    static = out / "_static"
    static.mkdir(parents=True, exist_ok=True)
    (static / CSS_NAME).write_text(CSS)
    if app.builder.name != "html":
        return
    meta = _meta(app)
    for docname in sorted(app.env.found_docs):
        source = _chapter_source(app, docname)
        if source is not None:
            target = out / "_sources" / "chapters" / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(publish.runnable_source(source.read_text(), meta, source.name))
    pdf = _pdf(app)
    if pdf is not None:
        shutil.copyfile(pdf, out / publish.PDF_NAME)


# ------------------------------------------------------------------ directive
class CitationDirective(SphinxDirective):
    """``{bnbook-citation}``: this version's citation as BibTeX (default) or as a sentence."""

    has_content = False
    option_spec = {"format": lambda arg: directives.choice(arg, ("bibtex", "text"))}

    def run(self) -> list[nodes.Node]:
        meta = _meta(self.env.app)
        if self.options.get("format", "bibtex") == "bibtex":
            text = publish.bibtex(meta)
            block = nodes.literal_block(text, text, language="bibtex")
            self.set_source_info(block)
            return [block]
        where = f" {meta.repository}" if meta.repository else ""
        para = nodes.paragraph()
        para += nodes.Text(f"{meta.author} ({meta.year}). ")
        para += nodes.emphasis(text=meta.title)
        para += nodes.Text(f" (version {meta.version}) [executable book].{where}")
        return [para]


def setup(app: Sphinx) -> dict[str, Any]:
    import bnbook

    app.add_config_value("bnbook_chapters", "", "env")  # folder of the chapter sources (default: the repo's)
    app.add_config_value("bnbook_pdf", "", "html")  # the PDF edition to offer (default: _build/pdf/bnbook.pdf)
    app.add_config_value("bnbook_pdf_stamp", "", "html")
    app.add_config_value("bnbook_build", {}, "html")
    app.connect("config-inited", _on_config)
    app.connect("doctree-read", _set_alt_text)
    app.connect("html-page-context", _on_page, priority=600)  # after the book theme's buttons (501)
    app.connect("build-finished", _on_finished)
    app.add_css_file(CSS_NAME)
    app.add_directive("bnbook-citation", CitationDirective)
    return {"version": bnbook.__version__, "parallel_read_safe": True, "parallel_write_safe": True}
