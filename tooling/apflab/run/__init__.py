"""One run, end to end: the scenario, where it runs, the experiment (pressure,
workload, evidence) and its judgement (analysis → verdict.json, report.html)."""
