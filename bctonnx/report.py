"""Validation reports as a file: Markdown (``.md``) or HTML (``.html``), with a per-layer
error chart.

The chart (relative error of every LayerNorm output, the worst layer highlighted) is a PNG drawn
with matplotlib when it is installed, else an SVG bar chart written here (no dependency). A
Markdown report links it as a file next to the report (``<report stem>_layers.png|svg``); an
HTML report embeds it, so the .html is one self-contained file. Files are written under a
temporary name and renamed into place.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import os
import tempfile
from pathlib import Path

from .errors import BctError
from .validate import LayerStats, ValidationReport

FORMATS = {".md": "markdown", ".markdown": "markdown", ".html": "html", ".htm": "html"}


def report_format(path: str | os.PathLike) -> str:
    """``markdown`` or ``html`` from the file name; `BctError` for anything else or a folder
    that does not exist (checked before any work is done)."""
    p = Path(path)
    kind = FORMATS.get(p.suffix.lower())
    if kind is None:
        raise BctError(f"--report {p}: name it .md (Markdown) or .html")
    if not p.resolve().parent.is_dir():
        raise BctError(f"--report {p}: folder {p.resolve().parent} does not exist")
    return kind


# --- the chart -----------------------------------------------------------------------------------


def _chart_png(layers: list[LayerStats]) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    worst = max(range(len(layers)), key=lambda i: layers[i].rel_err)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(layers) + 2), 3.6), dpi=110)
    colors = ["#c0392b" if i == worst else "#2e86c1" for i in range(len(layers))]
    ax.bar(range(len(layers)), [s.rel_err for s in layers], color=colors)
    ax.set_xticks(range(len(layers)), [s.label for s in layers], rotation=60, ha="right")
    ax.set_ylabel("relative error")
    ax.set_title("per-layer relative error vs reference (LayerNorm outputs)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def chart_svg(layers: list[LayerStats]) -> str:
    """A bar chart of each layer's relative error as SVG text (the worst bar in red)."""
    bar, gap, left, top, height = 22, 8, 60, 30, 200
    width = left + len(layers) * (bar + gap) + 20
    vmax = max((s.rel_err for s in layers), default=0.0) or 1.0
    worst = max(range(len(layers)), key=lambda i: layers[i].rel_err) if layers else -1
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{top + height + 110}" '
        'font-family="sans-serif" font-size="11">',
        f'<text x="{left}" y="18" font-size="13">per-layer relative error vs reference '
        "(LayerNorm outputs)</text>",
        f'<line x1="{left}" y1="{top + height}" x2="{width - 10}" y2="{top + height}" '
        'stroke="#333"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + height}" stroke="#333"/>',
        f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{vmax:.3g}</text>',
        f'<text x="{left - 4}" y="{top + height}" text-anchor="end">0</text>',
    ]
    for i, s in enumerate(layers):
        h = height * s.rel_err / vmax
        x = left + gap + i * (bar + gap)
        color = "#c0392b" if i == worst else "#2e86c1"
        label = html.escape(s.label)
        parts.append(
            f'<rect x="{x}" y="{top + height - h:.1f}" width="{bar}" height="{h:.1f}" '
            f'fill="{color}"><title>{label}: {s.rel_err:.4g}</title></rect>'
        )
        cx, cy = x + bar / 2, top + height + 8
        parts.append(f'<text x="{cx}" y="{cy}" transform="rotate(60 {cx} {cy})">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


# --- the report -------------------------------------------------------------------------------------


def _tables(report: ValidationReport) -> list[tuple[str, list[str], list[list[str]]]]:
    outputs = [
        [
            o.name,
            f"{o.max_abs_err:.5f}",
            f"{o.mean_abs_err:.6f}",
            f"{o.cosine:.5f}",
            "" if o.top1_agreement is None else f"{o.top1_agreement:.4f}",
            "" if o.pooled_cosine is None else f"{o.pooled_cosine:.5f}",
        ]
        for o in report.outputs
    ]
    tables = [
        (
            "Outputs",
            ["output", "max abs err", "mean abs err", "cosine", "top-1 agree", "pooled cosine"],
            outputs,
        )
    ]
    if report.layers:
        worst = max(range(len(report.layers)), key=lambda i: report.layers[i].rel_err)
        rows = [
            [
                s.label + (" (largest)" if i == worst else ""),
                s.tensor,
                f"{s.max_abs_err:.5f}",
                f"{s.mean_abs_err:.6f}",
                f"{s.rel_err:.5f}",
                f"{s.cosine:.5f}",
            ]
            for i, s in enumerate(report.layers)
        ]
        tables.append(
            (
                "Per layer",
                ["layer", "tensor", "max abs err", "mean abs err", "rel err", "cosine"],
                rows,
            )
        )
    if report.int_ops:
        rows = [
            [o.op_type, o.node, f"{o.max_err_lsb:.2f}", f"{o.mean_err_lsb:.3f}", f"{o.rel_err:.5f}"]
            for o in report.int_ops
        ]
        tables.append(
            (
                "Integer ops vs their float originals",
                ["op", "node", "max err (LSB)", "mean err (LSB)", "rel err"],
                rows,
            )
        )
    return tables


_TEXT = ("output", "layer", "tensor", "op", "node")


def _markdown(report, reference, candidate, chart_name: str | None) -> str:
    lines = [
        "# bctonnx validation report",
        "",
        f"- reference: `{reference}`",
        f"- candidate: `{candidate}`",
        f"- compared on {report.num_inputs} inputs",
    ]
    if report.embedding_cosine is not None:
        lines.append(f"- sentence-embedding cosine vs reference: {report.embedding_cosine:.5f}")
    for title, header, rows in _tables(report):
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "|".join("---" if h in _TEXT else "---:" for h in header) + "|")
        for row in rows:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
        if title == "Per layer" and chart_name:
            lines += ["", f"![per-layer relative error]({chart_name})"]
    return "\n".join(lines) + "\n"


def _html(report, reference, candidate, chart_html: str | None) -> str:
    esc = html.escape
    parts = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8"><title>bctonnx validation report</title>',
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child,td:nth-child(2){text-align:left}</style>",
        "</head><body>",
        "<h1>bctonnx validation report</h1>",
        "<ul>",
        f"<li>reference: <code>{esc(str(reference))}</code></li>",
        f"<li>candidate: <code>{esc(str(candidate))}</code></li>",
        f"<li>compared on {report.num_inputs} inputs</li>",
    ]
    if report.embedding_cosine is not None:
        parts.append(
            f"<li>sentence-embedding cosine vs reference: {report.embedding_cosine:.5f}</li>"
        )
    parts.append("</ul>")
    for title, header, rows in _tables(report):
        parts += [f"<h2>{esc(title)}</h2>", "<table>"]
        parts.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        for row in rows:
            parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
        parts.append("</table>")
        if title == "Per layer" and chart_html:
            parts.append(f"<p>{chart_html}</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a report is for reading
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_validation_report(
    report: ValidationReport,
    path: str | os.PathLike,
    *,
    reference: str | os.PathLike = "",
    candidate: str | os.PathLike = "",
    use_matplotlib: bool = True,
) -> list[Path]:
    """Write ``report`` to ``path`` (.md or .html, see the module doc); returns the files
    written (the report, and for Markdown the chart next to it)."""
    out = Path(path)
    kind = report_format(out)
    png = _chart_png(report.layers) if report.layers and use_matplotlib else None
    written = []
    if kind == "html":
        chart = None
        if png is not None:
            chart = (
                '<img alt="per-layer relative error" src="data:image/png;base64,'
                + base64.b64encode(png).decode("ascii")
                + '">'
            )
        elif report.layers:
            chart = chart_svg(report.layers)
        text = _html(report, reference, candidate, chart)
    else:
        chart_name = None
        if report.layers:
            chart_path = out.with_name(f"{out.stem}_layers.{'png' if png else 'svg'}")
            data = png if png is not None else chart_svg(report.layers).encode("utf-8")
            _write_atomic(chart_path, data)
            written.append(chart_path)
            chart_name = chart_path.name
        text = _markdown(report, reference, candidate, chart_name)
    _write_atomic(out, text.encode("utf-8"))
    return [out, *written]
