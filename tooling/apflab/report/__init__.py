"""The human report: :func:`apflab.report.html.write_report` writes report.html with
figures from :mod:`apflab.report.plots` (matplotlib, imported only when drawing)."""
