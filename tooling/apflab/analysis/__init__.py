"""Trace analysis, pure and streaming: trace text → events → analysis → verdict.

* :mod:`~apflab.analysis.parse` — tracefs text → :class:`~apflab.analysis.parse.Event` s
* :mod:`~apflab.analysis.analyzer` — :func:`~apflab.analysis.analyzer.analyze` (events)
  and :func:`~apflab.analysis.analyzer.analyze_trace` (a trace file) → an
  :class:`~apflab.analysis.model.Analysis`; it routes each event to its concern:

  * :mod:`~apflab.analysis.tokens` — token lifecycle: not_present → completed →
    ready, gva matching, the wake-all flush
  * :mod:`~apflab.analysis.acks` — interrupt or halt path (#PF injection), ACK
    matching, the ordering quirk, back-to-back readies, the heuristic
  * :mod:`~apflab.analysis.classify` — which of the two classifications a trace allows
  * :mod:`~apflab.analysis.timeline`, :mod:`~apflab.analysis.summary`,
    :mod:`~apflab.analysis.invariants` — the outstanding-APF timeline, the event
    counters, the five trace invariants
  * :mod:`~apflab.analysis.state` — the working records (token, per-vCPU state)
* :mod:`~apflab.analysis.model` — the result records (Analysis, Invariant, ...)
* :mod:`~apflab.analysis.stats` — latency histograms
* :mod:`~apflab.analysis.verdict` — thresholds + evidence → PASS/FAIL/INVALID/ERROR,
  and the verdict.json / analysis documents

Only :func:`~apflab.analysis.parse.open_trace` (and so
:func:`~apflab.analysis.analyzer.analyze_trace`) touches files.

The hot modules run compiled by mypyc where ``make native`` built them and as plain
Python elsewhere (:mod:`~apflab.analysis.native` chooses, here, before any is imported).
"""

from apflab.analysis import native

native.select()
