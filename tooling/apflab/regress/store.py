"""The results store: every run's identity, verdict and metrics, night after night.

An embedded SQLite file by default (nothing to start: ``results/apflab.db``), or
PostgreSQL by URL (``postgresql+psycopg://user@host/db``) for a lab where many
hosts write; one code path for both (SQLAlchemy Core).  The schema is versioned:
:data:`MIGRATIONS` are applied in order on open, so an older store is upgraded
in place.  A run is stored once: importing a results dir again (or a whole
results root) is idempotent, keyed by the run's id and host.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from apflab.errors import UsageError

#: (metric, statistic) pairs kept per run, from verdict.json's latency_us
STATISTICS = ("p10", "p50", "p90", "p99", "max")

#: columns schema version 2 added: L1's kernel when the nested lab's KVM host is
#: under test (verdict.json's ``host_kernel``; NULL on bare metal and in old rows)
HOST_KERNEL_COLUMNS = ("host_kernel_release", "host_kernel_sha256", "host_kernel_json")


def _tables(md: sa.MetaData, version: int) -> tuple[sa.Table, sa.Table]:
    """The tables as schema ``version`` has them (the current one for queries,
    older ones for the migrations that create them)."""
    columns: list[sa.Column[Any]] = [
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_key", sa.String(200), nullable=False, unique=True),
        sa.Column("run_id", sa.String(100), nullable=False),
        sa.Column("night", sa.String(100)),
        sa.Column("kernel", sa.String(200), nullable=False),
        sa.Column("kernel_release", sa.String(100)),
        sa.Column("kernel_sha256", sa.String(64)),
        sa.Column("kernel_json", sa.Text),
        sa.Column("scenario_json", sa.Text),
        sa.Column("host", sa.String(200)),
        sa.Column("in_lab", sa.Boolean),
        sa.Column("apflab_commit", sa.String(64)),
        sa.Column("started_at", sa.String(32)),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("results_path", sa.Text),
        sa.Column("imported_at", sa.String(32)),
    ]
    if version >= 2:
        columns += [
            sa.Column("host_kernel_release", sa.String(100)),
            sa.Column("host_kernel_sha256", sa.String(64)),
            sa.Column("host_kernel_json", sa.Text),
        ]
    run_table = sa.Table("runs", md, *columns)
    metric_table = sa.Table(
        "metrics",
        md,
        sa.Column("run", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("metric", sa.String(64), primary_key=True),
        sa.Column("statistic", sa.String(16), primary_key=True),
        sa.Column("value", sa.Float, nullable=False),
    )
    return run_table, metric_table


metadata = sa.MetaData()
runs, metrics = _tables(metadata, 2)
schema_version = sa.Table("schema_version", metadata, sa.Column("version", sa.Integer))


def _v1(conn: sa.Connection) -> None:
    _tables(md := sa.MetaData(), 1)
    md.create_all(conn)


def _v2(conn: sa.Connection) -> None:
    for name in HOST_KERNEL_COLUMNS:
        col = runs.c[name]
        kind = col.type.compile(dialect=conn.dialect)
        conn.execute(sa.text(f"ALTER TABLE runs ADD COLUMN {name} {kind}"))


#: schema version N is reached by applying MIGRATIONS[N - 1]
MIGRATIONS: Sequence[Callable[[sa.Connection], None]] = (_v1, _v2)


def migrate(conn: sa.Connection, to: int | None = None) -> int:
    """Bring the schema to version ``to`` (default: the newest); return it.  Older
    versions are for tests that make a store as an earlier apflab wrote it."""
    target = len(MIGRATIONS) if to is None else to
    schema_version.create(conn, checkfirst=True)
    row = conn.execute(sa.select(schema_version.c.version)).first()
    have = row[0] if row else 0
    for version in range(have + 1, target + 1):
        MIGRATIONS[version - 1](conn)
    if row is None:
        conn.execute(schema_version.insert().values(version=target))
    elif have < target:
        conn.execute(schema_version.update().values(version=target))
    return max(have, target)


def url_of(store: str) -> str:
    """A store given as a path (SQLite) or a SQLAlchemy URL."""
    return store if "://" in store else f"sqlite:///{Path(store).resolve()}"


@dataclass
class Store:
    """An open store (see the module doc)."""

    engine: sa.Engine
    version: int

    @classmethod
    def open(cls, store: str) -> Store:
        try:
            engine = sa.create_engine(url_of(store))
            with engine.begin() as conn:
                version = migrate(conn)
        except sa.exc.SQLAlchemyError as err:
            raise UsageError(
                f"results store {store}: cannot open it ({err.__class__.__name__}: "
                f"{str(err).splitlines()[0]})"
            ) from None
        return cls(engine, version)

    def close(self) -> None:
        self.engine.dispose()

    # -- writing -----------------------------------------------------------------
    def add(
        self,
        doc: dict[str, Any],
        results: Path,
        night: str | None = None,
        kernel: str | None = None,
    ) -> bool:
        """Store one run's verdict document; False if it was stored already."""
        key = f"{_machine(doc)}/{doc['run_id']}"
        with self.engine.begin() as conn:
            if conn.execute(sa.select(runs.c.id).where(runs.c.run_key == key)).first():
                return False
            row = _run_row(doc, key, results, night, kernel)
            inserted = conn.execute(runs.insert().values(**row)).inserted_primary_key
            assert inserted is not None
            pk = inserted[0]
            values = [
                {"run": pk, "metric": m, "statistic": s, "value": float(v)}
                for m, summary in (doc.get("latency_us") or {}).items()
                for s in STATISTICS
                if (v := (summary or {}).get(s)) is not None
            ]
            if values:
                conn.execute(metrics.insert(), values)
        return True

    def import_dirs(self, dirs: Iterable[Path], night: str | None = None) -> tuple[int, int]:
        """Import run dirs (each with verdict.json); return (added, already stored)."""
        added = known = 0
        for d in dirs:
            doc = json.loads((d / "verdict.json").read_text())
            if "run_id" not in doc:
                continue
            if self.add(doc, d, night):
                added += 1
            else:
                known += 1
        return added, known

    # -- reading -----------------------------------------------------------------
    def history(
        self, kernel: str | None = None, metric: str | None = None, statistic: str = "p50"
    ) -> list[dict[str, Any]]:
        """Runs in time order, with the chosen metric's statistic (or every metric)."""
        q = sa.select(runs).order_by(runs.c.started_at, runs.c.id)
        if kernel is not None:
            q = q.where(sa.or_(runs.c.kernel == kernel, runs.c.kernel_release == kernel))
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(q)]
            mq = sa.select(metrics).where(metrics.c.statistic == statistic)
            if metric is not None:
                mq = mq.where(metrics.c.metric == metric)
            by_run: dict[int, dict[str, float]] = {}
            for m in conn.execute(mq):
                by_run.setdefault(m.run, {})[m.metric] = m.value
        for r in rows:
            r["metrics"] = by_run.get(r["id"], {})
            r["kernel_facts"] = json.loads(r.pop("kernel_json") or "null")
            r["scenario"] = json.loads(r.pop("scenario_json") or "null")
            r["host_kernel"] = json.loads(r.pop("host_kernel_json") or "null")
        return rows

    def kernels(self) -> list[str]:
        with self.engine.connect() as conn:
            q = sa.select(runs.c.kernel).distinct().order_by(runs.c.kernel)
            return [r[0] for r in conn.execute(q)]


def kernel_label(doc: dict[str, Any]) -> str:
    """A kernel's name in the store: its release, plus the patches and boot
    parameters that make it another kernel; and L1's kernel when it was built
    (``on host RELEASE PATCHES``: host-side KVM under test)."""
    k = doc.get("kernel") or {}
    parts = [str(k.get("release"))]
    parts += [Path(p["path"]).stem for p in k.get("patches") or []]
    scenario = doc.get("scenario") or {}
    if scenario.get("cmdline"):
        parts.append(str(scenario["cmdline"]))
    hk = doc.get("host_kernel") or {}
    if hk.get("sha256"):  # built by apflab (not the lab image's own kernel)
        parts += ["on host", str(hk.get("release"))]
        parts += [Path(p["path"]).stem for p in hk.get("patches") or []]
    return " ".join(parts)


def _machine(doc: dict[str, Any]) -> str:
    """The machine that ran it (the lab's L1 is the same on every machine)."""
    return str((doc.get("apflab") or {}).get("machine") or (doc.get("host") or {}).get("hostname"))


def _run_row(
    doc: dict[str, Any], key: str, results: Path, night: str | None, kernel: str | None
) -> dict[str, Any]:
    k = doc.get("kernel") or {}
    hk = doc.get("host_kernel") or {}
    host = doc.get("host") or {}
    run_id = str(doc["run_id"])
    return {
        "run_key": key,
        "run_id": run_id,
        "night": night,
        "kernel": kernel or kernel_label(doc),
        "kernel_release": k.get("release"),
        "kernel_sha256": k.get("sha256"),
        "kernel_json": json.dumps(k),
        "scenario_json": json.dumps(doc.get("scenario")),
        "host": _machine(doc),
        "in_lab": bool(host.get("in_lab")),
        "apflab_commit": (doc.get("apflab") or {}).get("commit"),
        "started_at": (doc.get("apflab") or {}).get("started_at"),
        "verdict": doc["verdict"],
        "reason": doc.get("reason"),
        "results_path": str(results.resolve()),
        "imported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host_kernel_release": hk.get("release"),
        "host_kernel_sha256": hk.get("sha256"),
        "host_kernel_json": json.dumps(hk) if hk else None,
    }
