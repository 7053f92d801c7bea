"""The kit every saesweep HTML page is made of: one self-contained file, no server, no network.

A page is static HTML plus, in one `<script type="application/json" id="saesweep-data">`,
the data its scripts draw (figures by id). Plots are drawn by plotly.js, inlined once
per page from the copy inside the plotly wheel (no CDN, so it opens offline from the
file system); pages without plots leave it out. Tables with `class="sortable"` sort
when a column header is clicked: numerically by each cell's `data-sort`, else by text.
"""

from __future__ import annotations

import html
import importlib.util
import json
import math
from pathlib import Path
from typing import Any, Iterable

DATA_ID = "saesweep-data"

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; padding: 16px 24px 48px;
       max-width: 1400px; color: #222; }
h1 { font-size: 22px; margin: 8px 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin: 16px 0 6px; }
.muted { color: #666; } code { background: #f3f3f3; padding: 1px 4px; border-radius: 3px; font-size: 12.5px; }
table { border-collapse: collapse; margin: 6px 0; font-size: 13px; }
th, td { border-bottom: 1px solid #e3e3e3; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f6f6f6; position: sticky; top: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[aria-sort="ascending"]::after { content: " \\25B2"; font-size: 10px; }
table.sortable th[aria-sort="descending"]::after { content: " \\25BC"; font-size: 10px; }
.status-done { color: #1a7f37; font-weight: 600; } .status-failed { color: #c62828; font-weight: 600; }
.status-running { color: #b26a00; font-weight: 600; } .status-pending { color: #6e7781; font-weight: 600; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 8px 16px; }
.plot { height: 380px; min-width: 0; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 4px; }
"""

SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var ascending = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var cell = row.cells[col];
        var sort = cell.getAttribute("data-sort");
        if (sort !== null && sort !== "" && !isNaN(Number(sort))) return [0, Number(sort)];
        var text = cell.textContent.trim();
        return text === "" ? [2, ""] : [1, text.toLowerCase()];
      }
      rows.sort(function (a, b) {
        var ka = key(a), kb = key(b);
        if (ka[0] !== kb[0]) return ka[0] - kb[0];  // numbers, then text, then empty cells
        var c = ka[1] < kb[1] ? -1 : ka[1] > kb[1] ? 1 : 0;
        return ascending ? c : -c;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""

PLOT_JS = (
    """
(function () {
  var data = JSON.parse(document.getElementById("%s").textContent);
  document.querySelectorAll("div.plot[data-figure]").forEach(function (div) {
    var figure = data.figures[div.getAttribute("data-figure")];
    Plotly.newPlot(div, figure.data, figure.layout, {responsive: true, displaylogo: false});
  });
})();
"""
    % DATA_ID
)


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def plotly_js() -> str:
    """plotly.min.js from the installed plotly package (found without importing plotly)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the HTML reports need the plotly package (pip install plotly)")
    return (Path(spec.submodule_search_locations[0]) / "package_data" / "plotly.min.js").read_text(encoding="utf-8")


def finite_or_none(value: Any) -> Any:
    """NaN and infinities as null, all the way down: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def data_script(data: dict[str, Any]) -> str:
    """The page's data as JSON in a script element; '<' escaped so no string in it can end the element."""
    text = json.dumps(finite_or_none(data), allow_nan=False, separators=(",", ":")).replace("<", "\\u003c")
    return f'<script type="application/json" id="{DATA_ID}">{text}</script>'


def read_page_data(page: str) -> dict[str, Any]:
    """The data a page embeds (what its plots draw): for tests and for anyone scripting pages."""
    start_tag = f'<script type="application/json" id="{DATA_ID}">'
    start = page.index(start_tag) + len(start_tag)
    return json.loads(page[start : page.index("</script>", start)])


def plot(figure_id: str, css_class: str = "plot") -> str:
    return f'<div class="{css_class}" data-figure="{esc(figure_id)}"></div>'


def table(columns: Iterable[tuple[str, bool]], rows: Iterable[Iterable[str]], sortable: bool = False) -> str:
    """columns: (header, numeric); rows: cells already rendered with `cell`."""
    cols = list(columns)
    head = "".join(f'<th class="num">{esc(h)}</th>' if num else f"<th>{esc(h)}</th>" for h, num in cols)
    body = "".join(f"<tr>{''.join(r)}</tr>" for r in rows)
    cls = ' class="sortable"' if sortable else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def cell(html_text: str, sort: float | None = None, numeric: bool = False, css: str = "") -> str:
    """A td holding already-escaped HTML; `sort` is its numeric sort key."""
    classes = " ".join(c for c in ("num" if numeric else "", css) if c)
    attrs = f' class="{classes}"' if classes else ""
    if sort is not None and math.isfinite(sort):
        attrs += f' data-sort="{sort!r}"'
    return f"<td{attrs}>{html_text}</td>"


def document(title: str, body: str, figures: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> str:
    """A whole page. With `figures` (id -> plotly figure), plotly.js is inlined and draws them."""
    data = {"figures": figures or {}, **(extra or {})}
    scripts = [data_script(data)]
    if figures:
        scripts.append(f"<script>{plotly_js()}</script>")
        scripts.append(f"<script>{PLOT_JS}</script>")
    scripts.append(f"<script>{SORT_JS}</script>")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n"
        f"<body>\n{body}\n{''.join(scripts)}\n</body></html>\n"
    )
