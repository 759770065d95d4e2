"""The results store on a real PostgreSQL server, started and stopped by the test.

The same recorded runs (tests/unit/fixtures/verdicts/, real lab runs) go into a
SQLite file and into PostgreSQL 15 (its own cluster in a temp dir, Unix socket
only, as the postgres user): both give the same history, a second import stores
nothing twice, and the schema is at the newest version; a store of schema 1 migrates.
"""

import shutil
import subprocess
import tempfile
from pathlib import Path

import sqlalchemy as sa
from avocado import Test

from apflab.regress.store import MIGRATIONS, Store, migrate

FIXTURES = Path(__file__).resolve().parents[1] / "unit" / "fixtures" / "verdicts"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
PORT = "54329"


class PostgresStore(Test):
    """
    :avocado: tags=store
    """

    timeout = 300

    def setUp(self) -> None:
        if not (PG_BIN / "postgres").is_file():
            self.fail(f"PostgreSQL 15 is not installed ({PG_BIN}): make deps installs it")
        # not under the test's workdir: the postgres user cannot enter Avocado's 0700
        # results dirs, and the server's socket path must stay short (108 bytes)
        self.base = Path(tempfile.mkdtemp(prefix="apflab-pg-", dir="/var/tmp"))
        self.data = self.base / "data"
        shutil.chown(self.base, "postgres", "postgres")
        self.pg("initdb", "-D", str(self.data), "-A", "trust", "-U", "apflab")
        options = f"-k {self.base} -c listen_addresses= -p {PORT}"
        # -l: the server's output to a file (it would hold our pipes open for good)
        log = str(self.base / "server.log")
        self.pg("pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", "start")
        self.pg("createdb", "-h", str(self.base), "-p", PORT, "-U", "apflab", "apflab")

    def pg(self, tool: str, *args: str) -> None:
        proc = subprocess.run(
            ["runuser", "-u", "postgres", "--", str(PG_BIN / tool), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")

    def tearDown(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            if (self.base / "server.log").exists():
                shutil.copy2(self.base / "server.log", Path(self.logdir) / "postgres.log")
            shutil.rmtree(self.base, ignore_errors=True)

    def test_same_history_as_sqlite(self) -> None:
        dirs = sorted(d for d in FIXTURES.iterdir() if (d / "verdict.json").is_file())
        self.assertGreaterEqual(len(dirs), 4, "recorded runs missing")
        url = f"postgresql+psycopg://apflab@/apflab?host={self.base}&port={PORT}"
        histories = []
        for where in (str(Path(self.workdir) / "apflab.db"), url):
            store = Store.open(where)
            try:
                self.assertEqual(store.version, len(MIGRATIONS))
                self.assertEqual(store.import_dirs(dirs, "night-1"), (len(dirs), 0))
                self.assertEqual(store.import_dirs(dirs, "night-1"), (0, len(dirs)))
                rows = store.history(metric="ready_to_ack")
                histories.append([(r["run_id"], r["verdict"], r["metrics"]) for r in rows])
            finally:
                store.close()
        self.assertEqual(histories[0], histories[1])
        self.whiteboard = f"{len(dirs)} runs in SQLite and PostgreSQL 15"

    def test_a_version_1_store_is_migrated(self) -> None:
        """Schema 1 (before host kernels were recorded) migrates on PostgreSQL too."""
        url = f"postgresql+psycopg://apflab@/apflab?host={self.base}&port={PORT}"
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            migrate(conn, to=1)
        engine.dispose()
        dirs = sorted(d for d in FIXTURES.iterdir() if (d / "verdict.json").is_file())[:2]
        store = Store.open(url)
        try:
            self.assertEqual(store.version, len(MIGRATIONS))
            self.assertEqual(store.import_dirs(dirs, "night-1"), (2, 0))
            rows = store.history()
            self.assertEqual([r["host_kernel"] is not None for r in rows], [True, True])
        finally:
            store.close()
