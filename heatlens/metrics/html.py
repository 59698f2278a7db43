"""An evaluation report as one self-contained HTML page: the ranking table, the curves as plots
and each image's maps side by side, every picture embedded (no other file needed to view it)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from heatlens.metrics.report import HIGHER_IS_BETTER, Report

_CURVE_TITLES = {
    "deletion": "Deletion, most relevant first\n(lower is more faithful)",
    "deletion_lerf": "Deletion, least relevant first\n(higher is more faithful)",
    "insertion": "Insertion, most relevant first\n(higher is more faithful)",
    "road_morf": "ROAD, most relevant removed, imputed\n(lower is more faithful)",
    "road_lerf": "ROAD, least relevant removed, imputed\n(higher is more faithful)",
}

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.best { font-weight: bold; background: #e8f4e8; }
tr.control td { color: #777; }
figure { display: inline-block; margin: 0.4em; text-align: center; }
figcaption { font-size: 0.85em; }
img { max-width: 100%; }
"""


def png_data_url(image: Image.Image) -> str:
    """A picture as a `data:` URL, to embed in a page."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _table(report: Report) -> str:
    summary = report.summary()
    metrics = list(report.scores)
    best = {m: report.ranking(m)[0] for m in metrics if report.ranking(m)}
    head = "".join(f"<th>{html.escape(m)}<br><small>{'higher' if HIGHER_IS_BETTER[m] else 'lower'}"
                   " is better</small></th>" for m in metrics)
    rows = []
    for source in [*report.sources, *report.controls]:
        control = source in report.controls
        cells = []
        for metric in metrics:
            s = summary[metric].get(source)
            text = "n/a" if s is None else f"{s.mean:.3f} [{s.low:.3f}, {s.high:.3f}]"
            klass = ' class="best"' if best.get(metric) == source else ""
            cells.append(f"<td{klass}>{text}</td>")
        name = f"{html.escape(source)}{' (control)' if control else ''}"
        rows.append(f'<tr{" class=control" if control else ""}><td>{name}</td>{"".join(cells)}'
                    "</tr>")
    return f"<table><tr><th>source</th>{head}</tr>{''.join(rows)}</table>"


def _curves(report: Report) -> str:
    from matplotlib.figure import Figure

    figures = []
    for name, by_source in report.curves.items():
        figure = Figure(figsize=(5, 3.4), layout="constrained")
        axes = figure.add_subplot()
        for source, (x, y) in by_source.items():
            style = "--" if source in report.controls else "-"
            axes.plot(x.cpu().numpy(), y.mean(dim=0).cpu().numpy(), style, label=source)
        axes.set_xlabel("fraction of pixels changed")
        axes.set_ylabel("score of the class (mean over images)")
        axes.set_title(_CURVE_TITLES.get(name, name), fontsize="medium")
        axes.legend(fontsize="small")
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=90)
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        figures.append(f'<figure><img src="data:image/png;base64,{data}" alt="{name} curve">'
                       "</figure>")
    return "".join(figures)


def write_html(report: Report, path: str | Path, *, title: str, panels: Sequence[
        tuple[str, Sequence[tuple[str, Image.Image]]]] = (), details: Sequence[str] = ()
               ) -> Path:
    """Write ``report`` as one HTML page at ``path``.

    Args:
        title: the page's heading.
        panels: per image, its name and ``(caption, picture)`` pairs (the maps over the image).
        details: lines of context (the model, the protocol, the command).
    """
    sections = [f"<h1>{html.escape(title)}</h1>"]
    sections += [f"<p>{html.escape(line)}</p>" for line in [*details, report.protocol] if line]
    sections.append("<h2>Ranking</h2><p>Mean over the images with its 95 % bootstrap interval; "
                    "the best explanation of each metric in bold. Controls ignore the model (or "
                    "the image) and show what chance gets.</p>")
    sections.append(_table(report))
    verdicts = [f"<li>{html.escape(source)}: {html.escape(result.reason)}</li>"
                for source, results in report.sanity.items() for result in results]
    if verdicts:
        sections.append(f"<h2>Sanity checks</h2><ul>{''.join(verdicts)}</ul>")
    if report.notes:
        sections.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
                        + "</ul>")
    if report.curves:
        sections.append(f"<h2>Curves</h2>{_curves(report)}")
    if panels:
        sections.append("<h2>Maps</h2>")
        for name, pictures in panels:
            figures = "".join(f'<figure><img src="{png_data_url(picture)}" '
                              f'alt="{html.escape(caption)}">'
                              f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                              for caption, picture in pictures)
            sections.append(f"<h3>{html.escape(name)}</h3><div>{figures}</div>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(sections)}</body></html>")
    target = Path(path)
    target.write_text(page, encoding="utf-8")
    return target
