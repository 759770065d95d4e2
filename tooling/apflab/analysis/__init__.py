"""Trace analysis: parse (text → events), lifecycle (tokens, ACKs, invariants),
stats (latency histograms), verdict (thresholds + evidence → PASS/FAIL/INVALID/ERROR).

Pure code: only :func:`apflab.analysis.parse.open_trace` touches files.
"""
