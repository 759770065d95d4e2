"""Outstanding async PFs per vCPU over time, in a bounded number of bins.

Each vCPU has a :class:`Series`: the maximum number of outstanding tokens per
bin.  When a sample falls past the last allowed bin, every bin doubles in width
(neighbours merged by their maximum), so memory stays bounded however long the
trace is.
"""

from __future__ import annotations

from collections.abc import Iterable

from apflab.analysis.model import Timeline


class Series:
    """One vCPU's bins and its current number of outstanding tokens."""

    __slots__ = ("bins", "outstanding")

    def __init__(self) -> None:
        self.bins: list[int] = []
        self.outstanding = 0


class TimelineBuilder:
    """All vCPUs' series on one time axis starting at the first event.

    :param max_bins: most points per series
    :param initial_bin_us: first bin width (doubled as needed)
    """

    def __init__(self, max_bins: int, initial_bin_us: int) -> None:
        self.max_bins = max_bins
        self.bin_us = initial_bin_us
        #: time of the first event (bin 0 starts there); set by the analyzer
        self.t0_us: int | None = None
        self._series: list[Series] = []
        #: the longest not_present→ready of the readies of each bin (µs; 0: none)
        self.ready_latency = self.new_series()

    def new_series(self) -> Series:
        series = Series()
        self._series.append(series)
        return series

    def _bin(self, ts_us: int) -> int:
        """The bin ``ts_us`` falls in, widening every bin until it fits."""
        assert self.t0_us is not None
        offset = ts_us - self.t0_us
        # a line logged before the first one (clock skew between CPUs): bin 0
        index = offset // self.bin_us if offset > 0 else 0
        while index >= self.max_bins:
            self._double_bin_width()
            index = (ts_us - self.t0_us) // self.bin_us
        return index

    def record(self, series: Series, ts_us: int, outstanding: int) -> None:
        """From ``ts_us`` on, ``series`` has ``outstanding`` tokens outstanding."""
        index = self._bin(ts_us)
        bins = series.bins
        if index >= len(bins):
            bins.extend([series.outstanding] * (index + 1 - len(bins)))
        # the bin's maximum (a conditional, not max(): this runs twice per token)
        bins[index] = outstanding if outstanding > bins[index] else bins[index]
        series.outstanding = outstanding

    def record_peak(self, series: Series, ts_us: int, value: int) -> None:
        """A sample at ``ts_us``: the bin keeps its largest (empty bins stay 0)."""
        index = self._bin(ts_us)
        bins = series.bins
        if index >= len(bins):
            bins.extend([0] * (index + 1 - len(bins)))
        bins[index] = value if value > bins[index] else bins[index]

    def _double_bin_width(self) -> None:
        self.bin_us *= 2
        for series in self._series:
            b = series.bins
            series.bins = [max(b[i : i + 2]) for i in range(0, len(b), 2)]

    def build(self, labelled: Iterable[tuple[str, Series]], end_us: int | None) -> Timeline:
        """The :class:`Timeline` of the given series, each extended to ``end_us``."""
        if self.t0_us is None or end_us is None:
            return Timeline(0, self.bin_us, {})
        chosen = list(labelled)
        for _, series in chosen:
            self.record(series, max(end_us, self.t0_us), series.outstanding)
        self.record_peak(self.ready_latency, max(end_us, self.t0_us), 0)
        by_label = {label: series.bins for label, series in chosen}
        return Timeline(
            self.t0_us, self.bin_us, dict(sorted(by_label.items())), self.ready_latency.bins
        )
