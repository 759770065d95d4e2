"""Regression across kernels and nights: comparison against a reference kernel
(``compare``), and (next) the results store, change detection and nightly matrices."""
