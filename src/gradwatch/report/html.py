"""The self-contained HTML report: verdict, findings with remedies, charts, run metadata.

No network, scripts or fonts from outside: charts are PNGs embedded as data URIs and the page has
no script at all. Every name and message from the run is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from gradwatch.extras import optional
from gradwatch.guards.base import EVENT_KINDS
from gradwatch.report.data import ReportData


def _charts():  # matplotlib loads only when a report is drawn
    optional("matplotlib", "the charts of a gradwatch report")
    from gradwatch.report import charts

    return charts


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1250px; color: #1d2430; padding: 0 1rem; }
h1 { font-size: 1.5rem; margin-bottom: 0.2rem; }
.verdict { padding: 0.9rem 1.2rem; border-radius: 8px; font-size: 1.2rem; font-weight: 600; }
.healthy { background: #e4f6e8; border: 1px solid #7cc38c; }
.problems { background: #fdeaea; border: 1px solid #e08a8a; }
.empty { background: #f1f1f1; border: 1px solid #bbb; }
.note { color: #555; margin: 0.4rem 0 1rem; }
.finding { border-left: 4px solid #e08a8a; padding: 0.4rem 0.8rem; margin: 0.6rem 0;
           background: #fffafa; }
.finding.warning { border-color: #e0b84a; background: #fffdf5; }
.finding .head { font-weight: 600; }
.finding .remedy { margin-top: 0.3rem; }
figure { margin: 1.2rem 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-weight: 600; margin-bottom: 0.3rem; }
table { border-collapse: collapse; font-size: 0.9rem; }
td, th { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
pre { white-space: pre-wrap; font-size: 0.8rem; max-height: 20rem; overflow: auto; }
"""


# Nothing may load or run: no scripts at all, images only from the page itself.
_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _findings_html(data: ReportData) -> str:
    if not data.findings:
        return '<p class="note">No findings.</p>'
    parts = []
    for f in data.findings:
        steps = (
            f"step {f.step}" if f.last_step in (None, f.step) else f"steps {f.step}–{f.last_step}"
        )
        where = f"layer <code>{_e(f.layer)}</code>" if f.layer else "the whole model"
        parts.append(
            f'<div class="finding {_e(f.severity)}"><div class="head">{_e(f.kind)} at {where}, '
            f"{steps} ({_e(f.severity)})</div><div>{_e(f.message)}</div>"
            f'<div class="remedy"><b>What to do:</b> {_e(f.remedy)}</div></div>'
        )
    return "\n".join(parts)


def _charts_html(pngs: dict[str, bytes | str | None]) -> str:
    parts = []
    charts = _charts()
    shown = {**charts.CHARTS, **{k: v for k, v in charts.OPTIONAL_CHARTS.items() if pngs.get(k)}}
    for chart_id, (title, _) in shown.items():
        png = pngs.get(chart_id)
        if not isinstance(png, bytes):
            kind, sentence = (
                ("missing", "Not recorded in this run.") if png is None else ("nothing", png)
            )
            parts.append(
                f'<figure id="chart-{chart_id}" class="{kind}"><figcaption>'
                f'{_e(title)}</figcaption><p class="note">{_e(sentence)}</p></figure>'
            )
            continue
        encoded = base64.b64encode(png).decode("ascii")
        parts.append(
            f'<figure id="chart-{chart_id}"><figcaption>{_e(title)}</figcaption>'
            f'<img alt="{_e(title)}" src="data:image/png;base64,{encoded}"></figure>'
        )
    return "\n".join(parts)


def _meta_html(data: ReportData) -> str:
    meta = dict(data.meta)
    model = meta.pop("model", {}) or {}
    rows = {
        "run store": data.run.path,
        "model": f"{model.get('class', '?')}: {model.get('parameters', '?')} parameters, "
        f"{model.get('watched_parameters', '?')} watched",
        "tensors / probed modules": f"{len(data.tensors)} / {len(data.modules)}",
        "processes": data.processes,
        "recorded steps": f"{len(data.steps)}"
        + (f" ({data.steps[0]}–{data.steps[-1]})" if len(data.steps) else ""),
        "guard events": ", ".join(
            f"{k}: {sum(e.kind == k for e in data.events)}" for k in EVENT_KINDS
        ),
    }
    rows.update(
        {
            k: json.dumps(v, default=str) if isinstance(v, (dict, list)) else v
            for k, v in meta.items()
        }
    )
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows.items())
    return (
        f"<table>{body}</table><details><summary>model</summary>"
        f"<pre>{_e(model.get('repr', ''))}</pre></details>"
    )


def build_html(data: ReportData) -> str:
    """The report page of a run, as a string."""
    state, sentence = data.verdict
    pngs = _charts().render_png(data) if len(data.steps) else {}
    title = f"gradwatch report: {data.path}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_POLICY}">
<title>{_e(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{_e(title)}</h1>
<div id="verdict" class="verdict {state}">{_e(sentence)}</div>
<p class="note" id="completeness">{_e(data.completeness)}</p>
<h2>Findings</h2>
<div id="findings">{_findings_html(data)}</div>
<h2>Charts</h2>
{_charts_html(pngs) if len(data.steps) else '<p class="note">No charts: no steps recorded.</p>'}
<h2>Run</h2>
<div id="meta">{_meta_html(data)}</div>
</body></html>
"""


def report(run_dir: str | Path, out: str | Path = "report.html") -> Path:
    """Write the self-contained HTML report of a run (also a live or killed one); return its path.

    Raises FileNotFoundError when `run_dir` holds no run store.
    """
    data = ReportData(run_dir)
    try:
        page = build_html(data)
    finally:
        data.close()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def write_pngs(run_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Write every chart of a run as `<chart>.png` in `out_dir`; return the paths written."""
    data = ReportData(run_dir)
    try:
        pngs = _charts().render_png(data) if len(data.steps) else {}
    finally:
        data.close()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for chart_id, png in pngs.items():
        if isinstance(png, bytes):
            path = out_dir / f"{chart_id}.png"
            path.write_bytes(png)
            written.append(path)
    return written
