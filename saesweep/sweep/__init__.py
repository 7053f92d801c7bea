"""What a sweep is once its members have run, and the pages that show it.

`members` (each member's status, overrides and metrics), `report` (report.md/.csv,
pareto.png, and the callback that writes the reports), `report_html` (report.html and
run.html), with `page` (the self-contained page kit), `figures` (the plotly figures),
`curves` (metrics.jsonl) and `stability` (decoder matches between members).
"""
