"""One night over many KVM hosts: Avocado's remote spawner, one store.

``apflab nightly --matrix FILE --hosts HOSTS`` (docs/scale.md, "Many hosts").
The night's cells x samples become the variants of one ``avocado run
--spawner=remote tests/functional/test_apf.py -m MATRIX SAMPLES`` (the plugin
``avocado-framework-plugin-spawner-remote`` 113.0).  Each host is one *slot*: a
JSON file of keyword arguments to ``aexpect.remote.remote_login`` (ssh with a
private key, the host key pinned through a known_hosts file of our own, and a
reverse forward that carries the test's status messages back to this
machine's status server).  One slot per host, so one run at a time per host.

What the plugin does not do, this module does:

* it ships nothing: every host runs its own apflab checkout at ``checkout``
  (same commit, checked before the job) and the test file at the same
  relative path (the setup hook ``cd``'s there);
* only Avocado's status comes back (debug.log, whiteboard, results.json):
  the runs' own dirs (verdict.json, trace, report.html) stay on the host at
  the local job's absolute path; they are fetched over SFTP, laid out as
  ``apflab nightly`` lays them out (``ROOT/<cell>/<run-id>``) and stored
  idempotently (keyed by machine and run id) into the one store;
* it logs into every slot when the first test starts and a dead host
  crashes the whole job: hosts are checked first and a dead one left out;
* it never closes its SSH sessions (they outlive the job, and a left-over
  reverse forward blocks the next night's login): the job runs with
  ``TMPDIR`` pointing at the night's own session dir, and the sessions
  found there are closed afterwards.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apflab import paths
from apflab.errors import ApflabError, UsageError
from apflab.regress import changes, nightly
from apflab.regress.store import Store
from apflab.run.matrix import Cell

Emit = Callable[[str], None]

#: the apf test, relative to the checkout (locally and on every host)
TEST = "tests/functional/test_apf.py"
#: the extra mux dimension that repeats every cell (never a scenario option)
SAMPLE_KEY = "apflab_sample"
#: the shell prompt aexpect waits for (root's bash: ``...# ``)
PROMPT = r"^.*[\#\$]\s*$"
#: the plugin's own post-test task runs this machine's interpreter path on
#: whichever slot is free: the setup hook runs ``apflab cleanup`` instead
DISABLED_PLUGINS = ["test.post.apflab-cleanup"]
AVOCADO_VERSION = "113.0"


@dataclass(frozen=True)
class Host:
    """One KVM host, reached over SSH (often a tunnel on 127.0.0.1:<port>)."""

    name: str
    port: int
    key: Path
    host_key: str
    address: str = "127.0.0.1"

    @property
    def alias(self) -> str:
        """Its name in our known_hosts (``HostKeyAlias``: the port may move)."""
        return f"apflab-{self.name}"


@dataclass(frozen=True)
class Hosts:
    """The hosts file: where apflab lives on each host, and the hosts."""

    checkout: str
    hosts: tuple[Host, ...]
    user: str = "root"
    venv: str = ".venv"
    status_port: int = 28888
    #: exported in each host's shell before anything runs (a lab VM as a host needs
    #: the lab's environment: apflab.lab.assets.L1_ENV)
    env: tuple[tuple[str, str], ...] = ()

    def shell_prefix(self) -> list[str]:
        """cd to the checkout, the venv, the environment: each an ``&&`` step."""
        steps = [shlex.join(["cd", self.checkout]), shlex.join([".", f"{self.venv}/bin/activate"])]
        if self.env:
            steps.append("export " + " ".join(shlex.quote(f"{k}={v}") for k, v in self.env))
        return steps

    def by_name(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)


def _shell_safe(text: str, what: str) -> str:
    """aexpect pastes paths into a ``bash -c`` line unquoted: refuse what needs quoting."""
    if not text or shlex.quote(text) != text:
        raise UsageError(f"{what} {text!r}: use a path without spaces or shell characters")
    return text


def _host(doc: dict[str, Any], where: str) -> Host:
    try:
        name = str(doc["name"])
        host = Host(
            name=name,
            port=int(doc["port"]),
            key=Path(_shell_safe(str(doc["key"]), f"{where}: key")).expanduser().resolve(),
            host_key=" ".join(str(doc["host_key"]).split()[:2]),
            address=str(doc.get("address", "127.0.0.1")),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise UsageError(f"{where}: needs name, port, key and host_key ({err})") from None
    if not name.replace("-", "").replace("_", "").isalnum():
        raise UsageError(f"{where}: name {name!r}: letters, digits, - and _ only")
    if len(host.host_key.split()) != 2:
        raise UsageError(f"{where}: host_key is an OpenSSH public key line ('TYPE BASE64')")
    if not host.key.is_file():
        raise UsageError(f"{where}: no private key file {host.key}")
    return host


def load_hosts(path: Path) -> Hosts:
    """Read and check a hosts file (JSON, see docs/scale.md).

    :raises UsageError: not JSON, a field missing or wrong, two hosts alike
    """
    try:
        doc = json.loads(path.read_text())
        entries = list(doc["hosts"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"hosts file {path}: not a hosts file ({err})") from None
    hosts = tuple(_host(e, f"hosts file {path}, host {i + 1}") for i, e in enumerate(entries))
    if not hosts:
        raise UsageError(f"hosts file {path}: no host in it")
    names = [h.name for h in hosts]
    ends = [(h.address, h.port) for h in hosts]
    if len(set(names)) != len(names) or len(set(ends)) != len(ends):
        raise UsageError(f"hosts file {path}: two hosts share a name or an address:port")
    checkout = _shell_safe(str(doc.get("checkout", "")), f"hosts file {path}: checkout")
    return Hosts(
        checkout=checkout,
        hosts=hosts,
        user=_shell_safe(str(doc.get("user", "root")), f"hosts file {path}: user"),
        venv=_shell_safe(str(doc.get("venv", ".venv")), f"hosts file {path}: venv"),
        status_port=int(doc.get("status_port", 28888)),
        env=_env(doc.get("env", {}), path),
    )


def _env(doc: object, path: Path) -> tuple[tuple[str, str], ...]:
    if not isinstance(doc, dict) or not all(
        isinstance(k, str) and k.isidentifier() and isinstance(v, str) for k, v in doc.items()
    ):
        raise UsageError(f"hosts file {path}: env maps variable names to strings")
    return tuple(sorted(doc.items()))


# -- the job's files ---------------------------------------------------------------
@dataclass(frozen=True)
class JobFiles:
    """Everything one remote night writes before Avocado starts (under ROOT/remote)."""

    dir: Path
    known_hosts: Path
    config: Path
    samples: Path
    sessions: Path
    results: Path
    listen_port: int


def free_port() -> int:
    """A free local TCP port for the status server (a small race, checked by bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ssh_options(host: Host, files: JobFiles, hosts: Hosts) -> list[str]:
    """The ssh options of a slot, before aexpect's own.

    aexpect (1.8.0, ``remote.remote_login``) always adds ``-o
    StrictHostKeyChecking=no``; ssh keeps the first value it is given for an
    option, and ``extra_cmdline`` comes first, so ours wins.
    """
    forward = f"127.0.0.1:{hosts.status_port}:127.0.0.1:{files.listen_port}"
    return [
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"HostKeyAlias={host.alias}",
        "-o", "BatchMode=yes",
        "-o", "IdentitiesOnly=yes",
        "-o", "ConnectTimeout=20",
        "-o", "ServerAliveInterval=15",
        "-o", "ServerAliveCountMax=8",
        "-o", "ExitOnForwardFailure=yes",
        "-R", forward,
    ]  # fmt: skip


def slot_doc(host: Host, files: JobFiles, hosts: Hosts) -> dict[str, Any]:
    """A slot file: ``aexpect.remote.remote_login(**doc)``."""
    return {
        "client": "ssh",
        "host": host.address,
        "port": str(host.port),
        "username": hosts.user,
        "password": "",
        "prompt": PROMPT,
        "identity_file": str(host.key),
        "user_known_hosts_file": str(files.known_hosts),
        "extra_cmdline": shlex.join(ssh_options(host, files, hosts)),
        "timeout": 60,
    }


def setup_hook(hosts: Hosts) -> str:
    """Run in each slot's shell before every task: the checkout, its venv, a cleanup.

    The shell is the same for every task of the slot, so ``cd`` and the venv stay.
    """
    return " && ".join((*hosts.shell_prefix(), shlex.join(["apflab", "cleanup"])))


def avocado_config(hosts: Hosts, live: Sequence[Host], files: JobFiles) -> str:
    """The job's Avocado config file (INI; ``%`` doubled for its interpolation)."""
    slots = [str(files.dir / f"slot-{h.name}.json") for h in live]
    sections = {
        "spawner.remote": {"slots": repr(slots), "setup_hook": setup_hook(hosts)},
        "run": {
            "status_server_auto": "False",
            "status_server_listen": f"127.0.0.1:{files.listen_port}",
            "status_server_uri": f"127.0.0.1:{hosts.status_port}",
            # more tasks than slots: the plugin raises "No free slot" and the job dies
            "max_parallel_tasks": str(len(live)),
        },
        "plugins": {"disable": repr(DISABLED_PLUGINS)},
    }
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {v.replace('%', '%%')}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def samples_yaml(samples: int) -> str:
    """The samples dimension, given first so the job runs cell after cell, then again."""
    body = "".join(f"  s{i}:\n    {SAMPLE_KEY}: {i}\n" for i in range(1, samples + 1))
    return f"{SAMPLE_KEY}: !mux\n{body}"


def write_job_files(root: Path, hosts: Hosts, samples: int) -> JobFiles:
    """The night's known_hosts, samples file and paths (slots come after the check)."""
    d = root / "remote"
    d.mkdir(mode=0o700, parents=True)
    _shell_safe(str(d), "results dir")
    files = JobFiles(
        dir=d,
        known_hosts=d / "known_hosts",
        config=d / "avocado.conf",
        samples=d / "samples.yaml",
        sessions=d / "sessions",
        results=root / "avocado",
        listen_port=free_port(),
    )
    files.sessions.mkdir(mode=0o700)
    files.known_hosts.write_text("".join(f"{h.alias} {h.host_key}\n" for h in hosts.hosts))
    files.samples.write_text(samples_yaml(samples))
    return files


def write_slots(hosts: Hosts, live: Sequence[Host], files: JobFiles) -> None:
    for h in live:
        path = files.dir / f"slot-{h.name}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(slot_doc(h, files, hosts), f, indent=1)
    files.config.write_text(avocado_config(hosts, live, files))


# -- before the job: which hosts can take part --------------------------------------
#: printed by each host's own interpreter, in its checkout's venv
PROBE = (
    "import json, os; from avocado.core.version import VERSION; from apflab import paths; "
    "print(json.dumps({'avocado': VERSION, 'commit': paths.repo_commit(), "
    "'machine': os.uname().nodename, 'kvm': os.path.exists('/dev/kvm')}))"
)


def ssh_argv(host: Host, files: JobFiles, hosts: Hosts, command: str) -> list[str]:
    """The ssh command a slot's session runs, with ``command`` for the remote shell."""
    return [
        "ssh",
        *ssh_options(host, files, hosts),
        "-o", f"UserKnownHostsFile={files.known_hosts}",
        "-p", str(host.port),
        "-i", str(host.key),
        f"{hosts.user}@{host.address}",
        command,
    ]  # fmt: skip


def probe_host(host: Host, files: JobFiles, hosts: Hosts, commit: str | None) -> str | None:
    """Why this host cannot take part tonight (None: it can).

    The same ssh options as its slot (pinned key, the reverse forward with
    ExitOnForwardFailure), then its checkout's avocado, commit and /dev/kvm.
    """
    from apflab.process import run  # noqa: PLC0415  (base layer)

    command = " && ".join((*hosts.shell_prefix(), shlex.join(["python3", "-c", PROBE])))
    out = run(ssh_argv(host, files, hosts, command), check=False, timeout=90)
    if not out.ok:
        last = (out.stderr.strip().splitlines() or ["no message"])[-1]
        return f"ssh or its checkout failed (exit {out.exit_status}): {last}"
    try:
        facts = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return f"unexpected answer: {out.stdout[-200:]!r}"
    if facts["avocado"] != AVOCADO_VERSION:
        return f"avocado {facts['avocado']} there, {AVOCADO_VERSION} needed"
    if commit and facts["commit"] != commit:
        return f"its checkout is at {facts['commit']}, this one at {commit}"
    if not facts["kvm"]:
        return "no /dev/kvm"
    return None


def usable_hosts(hosts: Hosts, files: JobFiles, emit: Emit) -> list[Host]:
    """The hosts that passed :func:`probe_host`; a dead host would crash the job.

    :raises ApflabError: none passed
    """
    commit = paths.repo_commit()
    live = []
    for h in hosts.hosts:
        why = probe_host(h, files, hosts, commit)
        if why is None:
            live.append(h)
            emit(f"== host {h.name} ({h.address}:{h.port}): ready")
        else:
            emit(f"== host {h.name} ({h.address}:{h.port}) left out tonight: {why}")
    if not live:
        raise ApflabError("no host of the hosts file can run tonight (see above)")
    return live


# -- the job ---------------------------------------------------------------------------
def avocado_argv(files: JobFiles, matrix: Path) -> list[str]:
    """``avocado run --spawner=remote`` of the apf test over samples x the matrix."""
    avocado = Path(sys.executable).parent / "avocado"
    return [
        str(avocado),
        "--config", str(files.config),
        "run",
        "--spawner=remote",
        "--job-results-dir", str(files.results),
        "--disable-sysinfo",
        TEST,
        "-m", str(files.samples), str(matrix.resolve()),
    ]  # fmt: skip


def run_avocado(argv: Sequence[str], files: JobFiles, emit: Emit) -> int:
    """Run the job from the checkout (the test's relative path), its output to ``emit``.

    ``TMPDIR`` is where aexpect keeps its sessions (so we find them after).
    """
    repo = paths.repo_root()
    if repo is None:
        raise UsageError("apflab nightly --hosts runs from an apflab checkout (tests/functional)")
    return stream_avocado(argv, repo, emit, {"TMPDIR": str(files.sessions)})


def stream_avocado(
    argv: Sequence[str], repo: Path, emit: Emit, env: dict[str, str] | None = None
) -> int:
    """Run an Avocado job from ``repo``, its output line by line to ``emit``; its exit.

    ``PATH`` starts with our venv's bin (aexpect runs ``aexpect_helper`` from it).
    """
    full = {
        **os.environ,
        **(env or {}),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    with subprocess.Popen(
        list(argv), cwd=repo, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            emit(line.rstrip("\n"))
        return proc.wait()


def latest_job(results: Path, status: int) -> Path:
    """The job dir Avocado just wrote under ``results``.

    :raises ApflabError: it left no results.json (the job never ran its tests)
    """
    job_dir = (results / "latest").resolve()
    if not (job_dir / "results.json").is_file():
        raise ApflabError(f"the Avocado job left no results.json (exit {status}); see above")
    return job_dir


def store_night(
    name: str,
    root: Path,
    hosts_dir: Path,
    job_dir: Path,
    matrix: Path,
    samples: Path,
    store_url: str,
    cells: list[Cell],
    base: str,
) -> nightly.Night:
    """The job's runs (``hosts_dir/<host>/<test dirs>``) laid out under ``root`` and
    stored, each cell against the baseline cell ``base``, change points over the
    store's history.  ``matrix`` and ``samples`` are the files the job ran."""
    store = Store.open(store_url)
    try:
        runs = collect_runs(
            root, hosts_dir, job_tests(job_dir), variant_cells(matrix, samples), store, name
        )
        comparisons = compare_tonight(root, cells, base)
        findings = changes.detect(store.history())
    finally:
        store.close()
    return nightly.Night(name, root, runs, comparisons, findings)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(p) for p in task.read_text().split()]
        except OSError:
            continue
    return out


def close_sessions(files: JobFiles) -> int:
    """Close the slots' SSH sessions the plugin leaves behind; return how many.

    Each aexpect session dir under ``files.sessions`` names its shell's pid;
    the shell's child is the ssh client, which we end only when its command
    line names this night's known_hosts file (a pid reused since is left alone).
    Its shell and aexpect's helper then exit on their own.
    """
    closed = 0
    marker = f"UserKnownHostsFile={files.known_hosts}"
    for pid_file in files.sessions.glob("aexpect_*/shell-pid"):
        try:
            shell = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            continue
        for child in _children(shell):
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"ssh") and marker.encode() in argv:
                os.kill(child, signal.SIGTERM)
                closed += 1
    return closed


# -- after the job: the runs back, into the store ----------------------------------------
@dataclass(frozen=True)
class Variant:
    cell: str
    sample: int


def variant_cells(matrix: Path, samples: Path) -> dict[str, Variant]:
    """Avocado's variant id (after ``;`` in a test id) -> the cell and sample it ran.

    The same files through the same yaml_to_mux give the same ids; the cell's
    name is :func:`apflab.regress.nightly.cells_of`'s (the sample leaf left out).
    """
    from avocado.core import varianter  # noqa: PLC0415  (Avocado first: yaml_to_mux needs it)
    from avocado_varianter_yaml_to_mux import mux  # noqa: PLC0415
    from avocado_varianter_yaml_to_mux import varianter_yaml_to_mux as loader  # noqa: PLC0415

    tree = loader.create_from_yaml([str(samples), str(matrix)])
    out = {}
    for variant in mux.MuxTree(tree):
        params: dict[str, Any] = {}
        for node in variant:
            params.update(node.environment)
        leaves = [n.path for n in variant if not n.path.startswith(f"/run/{SAMPLE_KEY}/")]
        cell = "-".join(p.rsplit("/", 1)[-1] for p in leaves) or "default"
        out[varianter.generate_variant_id(variant)] = Variant(cell, int(params[SAMPLE_KEY]))
    return out


def fetch_runs(hosts: Hosts, live: Sequence[Host], job_dir: Path, into: Path, emit: Emit) -> None:
    """Copy each host's part of the job (its tests' output dirs) to ``into/<host>``.

    A host writes its tests' dirs at this job's own absolute path (the plugin
    passes the local output dir); a host that ran no test has none.
    """
    import paramiko  # noqa: PLC0415  (only here)

    from apflab.vm.keys import parse_public_key  # noqa: PLC0415
    from apflab.vm.ssh import SSH  # noqa: PLC0415

    remote = str(job_dir / "test-results")
    for h in live:
        key = paramiko.PKey.from_path(h.key)
        with SSH(h.address, h.port, hosts.user, key, parse_public_key(h.host_key), h.name) as s:
            s.connect()
            if s.run(["test", "-d", remote], check=False).exit_status != 0:
                emit(f"== host {h.name}: ran no test")
                continue
            count = s.get_tree(remote, into / h.name)
            emit(f"== host {h.name}: {count} files fetched")


@dataclass(frozen=True)
class TestOutcome:
    """One Avocado test of the job (results.json), by its output dir's name."""

    test_id: str
    status: str
    reason: str


def job_tests(job_dir: Path) -> dict[str, TestOutcome]:
    doc = json.loads((job_dir / "results.json").read_text())
    return {
        Path(t["logdir"]).name: TestOutcome(t["id"], t["status"], t.get("fail_reason") or "")
        for t in doc["tests"]
    }


def _run_dirs(test_dir: Path) -> list[Path]:
    """A test's run dirs (``data/<run-id>/verdict.json``; not the ``latest`` link)."""
    data = test_dir / "data"
    if not data.is_dir():
        return []
    return sorted(
        d for d in data.iterdir() if not d.is_symlink() and (d / "verdict.json").is_file()
    )


def collect_runs(
    root: Path,
    fetched: Path,
    tests: dict[str, TestOutcome],
    variants: dict[str, Variant],
    store: Store,
    night: str,
) -> list[dict[str, Any]]:
    """Lay the fetched runs out as ``apflab nightly`` does (``ROOT/<cell>/<run-id>``)
    and store them (idempotent: keyed by machine and run id); one entry per run,
    and one ERROR entry per test whose run never came back."""
    runs: list[dict[str, Any]] = []
    came_back: set[str] = set()
    for host_dir in sorted(p for p in fetched.iterdir() if p.is_dir()) if fetched.is_dir() else []:
        for test_dir in sorted(p for p in host_dir.iterdir() if p.is_dir()):
            outcome = tests.get(test_dir.name)
            variant = variants.get(outcome.test_id.partition(";")[2]) if outcome else None
            if outcome is None or variant is None:
                continue
            for run_dir in _run_dirs(test_dir):
                came_back.add(test_dir.name)
                doc = json.loads((run_dir / "verdict.json").read_text())
                dest = root / variant.cell / run_dir.name
                if dest.exists():  # the same run id on two hosts (ids hold a pid)
                    dest = root / variant.cell / f"{host_dir.name}-{run_dir.name}"
                dest.parent.mkdir(exist_ok=True)
                run_dir.rename(dest)
                stored = "events" in doc and store.add(doc, dest, night, variant.cell)
                runs.append(
                    {
                        "cell": variant.cell,
                        "sample": variant.sample,
                        "host": host_dir.name,
                        "avocado": outcome.status,
                        "stored": stored,
                        **{k: doc.get(k) for k in ("run_id", "verdict", "reason")},
                    }
                )
    for name, outcome in tests.items():
        variant = variants.get(outcome.test_id.partition(";")[2])
        if name in came_back or variant is None:
            continue
        runs.append(
            {
                "cell": variant.cell,
                "sample": variant.sample,
                "host": None,
                "avocado": outcome.status,
                "stored": False,
                "run_id": None,
                "verdict": "ERROR",
                "reason": f"no run came back (Avocado {outcome.status}: {outcome.reason})",
            }
        )
    return sorted(runs, key=lambda r: (r["sample"], r["cell"]))


def compare_tonight(root: Path, cells: list[Cell], base: str) -> dict[str, dict[str, Any]]:
    """Each cell against the baseline; a cell with no run back is a FAIL of the night."""

    def has_runs(cell: Cell) -> bool:
        return any((root / cell.name).glob("*/verdict.json"))

    out = {
        c.name: {"verdict": "FAIL", "reason": "no run of this cell came back", "report": None}
        for c in cells
        if not has_runs(c)
    }
    if base not in out:
        out.update(nightly.compare_tonight(root, [c for c in cells if has_runs(c)], base))
    return out


def prune_remote(hosts: Hosts, live: Sequence[Host], job_dir: Path, root: Path) -> None:
    """Remove tonight's job dir from each host once fetched (traces add up)."""
    import paramiko  # noqa: PLC0415  (only here)

    from apflab.vm.keys import parse_public_key  # noqa: PLC0415
    from apflab.vm.ssh import SSH  # noqa: PLC0415

    if not (job_dir.name.startswith("job-") and job_dir.is_relative_to(root)):
        raise ApflabError(f"refusing to remove {job_dir} on the hosts: not tonight's job dir")
    for h in live:
        key = paramiko.PKey.from_path(h.key)
        with SSH(h.address, h.port, hosts.user, key, parse_public_key(h.host_key), h.name) as s:
            s.connect()
            s.run(["rm", "-rf", "--", str(job_dir)], check=False)


def run_remote_night(
    matrix: Path,
    samples: int,
    hosts_file: Path,
    store_url: str,
    results: Path,
    emit: Emit,
    night: str | None = None,
    baseline: str | None = None,
) -> nightly.Night:
    """:func:`apflab.regress.nightly.run_night`, its runs spread over the hosts."""
    cells, base = nightly.plan(matrix, emit, baseline)
    hosts = load_hosts(hosts_file)
    Store.open(store_url).close()  # a bad store URL fails now, not after the night
    name, root = nightly.night_root(results, night)
    root.mkdir(parents=True)
    files = write_job_files(root, hosts, samples)
    live = usable_hosts(hosts, files, emit)
    write_slots(hosts, live, files)
    try:
        status = run_avocado(avocado_argv(files, matrix), files, emit)
    finally:
        emit(f"== closed {close_sessions(files)} SSH session(s) the spawner left open")
    job_dir = latest_job(files.results, status)
    fetch_runs(hosts, live, job_dir, files.dir / "fetched", emit)
    result = store_night(
        name, root, files.dir / "fetched", job_dir, matrix, files.samples, store_url, cells, base
    )
    prune_remote(hosts, live, job_dir, root)
    doc = {**result.to_dict(), "hosts": [h.name for h in live], "avocado_exit": status}
    (root / "night.json").write_text(json.dumps(doc, indent=1) + "\n")
    return result
