"""Assemble the self-contained HTML report: header, table of contents, then every registered section.

Sections come from the registry in :mod:`convscope.report.sections` (files ``sec_*.py``). A section that
raises does not stop the report: it is replaced by an error box and listed in :attr:`Report.failures`.
Images are embedded as ``data:`` URIs and the CSS is inline, so the file needs no network and no
other file. Nothing here writes to disk; front ends save the text (``render.write_text_atomic``).
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .. import __version__
from ..errors import ConvscopeError, suggestion
from ..images import load_image
from ..models.model import as_model
from ..progress import tqdm
from ..render import data_uri
from .sections import ReportContext, Section, all_sections


class ReportError(ConvscopeError, ValueError):
    """A report option that cannot be used (e.g. an unknown section name)."""


@dataclass
class SectionResult:
    """What one section produced: its HTML (or the error that replaced it) and how long it took (s)."""

    key: str
    title: str
    html: str
    seconds: float
    error: str | None = None


@dataclass
class Report:
    """A finished report: the HTML text and per-section results (``failures`` lists the broken ones)."""

    html: str
    sections: list[SectionResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> list[SectionResult]:
        """Sections that raised (their HTML is an error box)."""
        return [s for s in self.sections if s.error is not None]

    def __str__(self) -> str:
        return self.html

    def _repr_html_(self) -> str:
        """Jupyter: the whole page in a sandboxed iframe (its CSS stays out of the notebook's)."""
        return f'<iframe sandbox srcdoc="{html.escape(self.html, quote=True)}" style="width:100%;height:720px;border:0"></iframe>'


# ============================================================================ helpers for sections


def figure_html(image: Image.Image, caption: str = "", *, alt: str = "", width: int | None = None) -> str:
    """An embedded picture with a one-sentence caption (``caption`` is HTML; ``alt`` plain text)."""
    style = f' style="max-width:{int(width)}px"' if width else ""
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img src="{data_uri(image)}" alt="{html.escape(alt or "figure")}"{style}>{cap}</figure>'


def table_html(header: Sequence[str], rows: Sequence[Sequence[Any]], *, numeric: Sequence[int] = (), cls: str = "") -> str:
    """A plain HTML table; cells are escaped, columns listed in ``numeric`` are right-aligned."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td{" class=num" if j in numeric else ""}>{html.escape(str(c))}</td>' for j, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    klass = f' class="{html.escape(cls)}"' if cls else ""
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ============================================================================ the report

CSS = """
:root{--fg:#1d2330;--muted:#5b6577;--line:#e3e7ee;--bg:#f6f7fb;--card:#fff;--accent:#3559c7;--bad:#b3261e}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif}
header{background:#1d2330;color:#fff;padding:28px 32px 22px}
header h1{margin:0 0 6px;font-size:26px;font-weight:650;letter-spacing:.2px}
header .meta{margin:0;color:#c9d1e3;font-size:14px}
header .meta b{color:#fff;font-weight:600}
.wrap{max-width:1120px;margin:0 auto;padding:24px 24px 48px}
nav.toc{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:14px 22px;margin-bottom:22px}
nav.toc h2{font-size:14px;text-transform:uppercase;letter-spacing:.08em;color:var(--muted);margin:0 0 6px}
nav.toc ol{margin:0;padding-left:20px;columns:2}
nav.toc a{color:var(--accent);text-decoration:none}
nav.toc .t{color:var(--muted);font-size:12px}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:8px 26px 22px;margin-bottom:22px}
section>h2{font-size:20px;margin:16px 0 4px}
section h3{font-size:16px;margin:18px 0 6px}
p.lead{color:var(--muted);margin-top:2px}
figure{margin:12px 0;display:inline-block;vertical-align:top;max-width:100%}
figure img{max-width:100%;height:auto;border:1px solid var(--line);border-radius:6px;image-rendering:auto}
figure img.pixelated,figure.px img{image-rendering:pixelated}
figcaption{color:var(--muted);font-size:13px;max-width:720px;margin-top:4px}
.row{display:flex;flex-wrap:wrap;gap:28px;align-items:flex-start}
table{border-collapse:collapse;font-size:13.5px;margin:8px 0}
th,td{padding:4px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:#f0f2f7;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
table.summary td{white-space:nowrap;font-size:12.5px}
.bar{display:inline-block;height:10px;background:var(--accent);border-radius:2px;vertical-align:middle}
details{margin:10px 0}
details>summary{cursor:pointer;color:var(--accent);font-weight:600}
ul.totals{margin:8px 0;padding-left:20px;color:var(--muted);font-size:13.5px}
.error{border:1px solid #f1b8b4;background:#fdf0ef;color:var(--bad);border-radius:8px;padding:10px 14px;margin:10px 0}
.timing{color:var(--muted);font-size:12px;font-weight:400;margin-left:8px}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.92em;background:#f0f2f7;padding:0 3px;border-radius:3px}
footer{color:var(--muted);font-size:12.5px;text-align:center;padding:10px 0 30px}
""".strip()


def select_sections(keys: Sequence[str] | None) -> list[Section]:
    """The registered sections to run, in report order (``keys``: a subset by key, ``None``: all)."""
    available = all_sections()
    if keys is None:
        return available
    by_key = {s.key: s for s in available}
    unknown = [k for k in keys if k not in by_key]
    if unknown:
        raise ReportError(
            f"unknown report section {unknown[0]!r}{suggestion(unknown[0], by_key)} (sections: {', '.join(by_key)})"
        )
    wanted = set(keys)
    return [s for s in available if s.key in wanted]


def render_report(
    model: Any,
    image: Any,
    *,
    image_name: str | None = None,
    options: dict[str, Any] | None = None,
    sections: Sequence[str] | None = None,
    progress: bool = True,
) -> Report:
    """Run every section on ``image`` and assemble the HTML page; section errors become error boxes.

    ``model``: a :class:`~convscope.Model` (a plain module gets :func:`~convscope.models.as_model`'s
    defaults). ``image``: path, PIL image, array or ``sample:NAME``.
    ``options`` are handed to every section (``ReportContext.options``). ``sections``: keys to run
    (default: all registered). ``progress``: a bar over the sections, and the sections' own bars, on a
    terminal (``False``: none). ``KeyboardInterrupt`` is never swallowed.
    """
    model = as_model(model)
    chosen = select_sections(sections)
    if image_name is None:
        image_name = image if isinstance(image, str) else "image"
    img = load_image(image)
    picture = model.transform_image(img)
    x = model.preprocess(img)
    ctx = ReportContext(model=model, image=picture, image_name=str(image_name), x=x, options=dict(options or {}), cache={},
                        progress=progress)
    start = time.perf_counter()
    results: list[SectionResult] = []
    bar = tqdm(chosen, desc="report", unit="section", disable=None if progress else True, leave=False)
    for sec in bar:
        bar.set_postfix_str(sec.key)
        t0 = time.perf_counter()
        try:
            fragment = sec.build(ctx)
            if not isinstance(fragment, str):
                raise TypeError(f"section returned {type(fragment).__name__}, not an HTML string")
            results.append(SectionResult(sec.key, sec.title, fragment, time.perf_counter() - t0))
        except Exception as exc:  # one broken section must not kill the report
            message = f"{type(exc).__name__}: {exc}".splitlines()[0]
            box = f'<div class="error"><b>This section failed.</b> {html.escape(message)}</div>'
            results.append(SectionResult(sec.key, sec.title, box, time.perf_counter() - t0, error=message))
    total = time.perf_counter() - start
    page = _page(model, ctx, results, total, __version__)
    return Report(html=page, sections=results, seconds=total)


def build_report(model: Any, image: Any, image_name: str | None = None, options: dict[str, Any] | None = None,
                 **kwargs: Any) -> str:
    """The report as one self-contained HTML string; ``kwargs`` (``sections``, ``progress``) as for
    :func:`render_report`, which also returns per-section timings and failures."""
    return render_report(model, image, image_name=image_name, options=options, **kwargs).html


def _page(model: Any, ctx: ReportContext, results: list[SectionResult], total: float, version: str) -> str:
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    name = html.escape(str(getattr(model, "name", "model")))
    image = html.escape(ctx.image_name)
    n_params = sum(p.numel() for p in model.module.parameters())
    h, w = model.input_size
    toc = "".join(
        f'<li><a href="#sec-{html.escape(r.key)}">{html.escape(r.title)}</a>'
        + (' <span class="t">(failed)</span>' if r.error else "")
        + "</li>"
        for r in results
    )
    body = "".join(
        f'<section id="sec-{html.escape(r.key)}"><h2>{html.escape(r.title)}'
        f'<span class="timing">{r.seconds:.1f} s</span></h2>{r.html}</section>'
        for r in results
    )
    manifest = {
        "generator": f"convscope {version}",
        "created": now,
        "model": str(getattr(model, "name", "model")),
        "model_source": str(getattr(model, "source", "")),
        "image": ctx.image_name,
        "device": str(model.device),
        "sections": {r.key: {"seconds": round(r.seconds, 3), "error": r.error} for r in results},
    }
    manifest_text = json.dumps(manifest, sort_keys=True).replace("--", "\\u002d\\u002d")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="generator" content="convscope {html.escape(version)}">'
        f"<title>convscope report: {image} on {name}</title>"
        f"<style>{CSS}</style></head>\n<body>\n"
        f"<!-- convscope-manifest {manifest_text} -->\n"
        "<header><h1>What the network sees</h1>"
        f'<p class="meta">Model <b>{name}</b> ({n_params:,} parameters, input {h}x{w}) &middot; image <b>{image}</b>'
        f" &middot; convscope {html.escape(version)} &middot; {now} &middot; {html.escape(str(model.device))}</p></header>\n"
        f'<div class="wrap"><nav class="toc"><h2>Contents</h2><ol>{toc}</ol></nav>\n<main>{body}</main>\n'
        f"<footer>Generated by convscope {html.escape(version)} in {total:.1f} s. This file is self-contained:"
        " every picture is embedded and nothing is loaded from the network.</footer></div>\n</body></html>\n"
    )
