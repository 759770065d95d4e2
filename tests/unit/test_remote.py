"""A night over many hosts (apflab.regress.remote), without a host: the hosts
file, the spawner's config and slots, the ssh options aexpect will use, the
variant ids Avocado will give, closing left-over sessions, and the fetched runs
laid out and stored once."""

import ast
import configparser
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apflab.errors import UsageError
from apflab.regress import nightly, remote
from apflab.regress.store import Store
from apflab.run import matrix as matrix_mod

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA3SvW8I26sSuKK+7bhcD70oAR+t1jL2xiS1lUkh4IBZ"
MATRIX = """\
kernel: !mux
  unpatched:
    kernel_source: debian-6.1
  late_ack:
    patch: guest_images/kernel/patches/ack-faults.patch
    cmdline: apflab_ack=delay:1000
"""


def hosts_file(tmp_path: Path, **extra: object) -> Path:
    key = tmp_path / "id_ed25519"
    key.write_text("not read here\n")
    doc = {
        "checkout": "/srv/apflab",
        "status_port": 28888,
        "hosts": [
            {"name": "kvm-a", "port": 2201, "key": str(key), "host_key": HOST_KEY + " a"},
            {"name": "kvm-b", "port": 2202, "key": str(key), "host_key": HOST_KEY},
        ],
        **extra,
    }
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps(doc))
    return path


def test_a_hosts_file_is_read_and_checked(tmp_path: Path) -> None:
    hosts = remote.load_hosts(hosts_file(tmp_path))
    assert [h.name for h in hosts.hosts] == ["kvm-a", "kvm-b"]
    assert hosts.hosts[0].host_key == HOST_KEY  # the comment dropped
    assert hosts.hosts[0].address == "127.0.0.1"
    with pytest.raises(UsageError, match="shell characters"):
        remote.load_hosts(hosts_file(tmp_path, checkout="/srv/apf lab"))
    doc = json.loads(hosts_file(tmp_path).read_text())
    doc["hosts"][1]["name"] = "kvm-a"
    (tmp_path / "dup.json").write_text(json.dumps(doc))
    with pytest.raises(UsageError, match="share a name"):
        remote.load_hosts(tmp_path / "dup.json")
    del doc["hosts"][1]["host_key"]
    (tmp_path / "nokey.json").write_text(json.dumps(doc))
    with pytest.raises(UsageError, match="host 2: needs"):
        remote.load_hosts(tmp_path / "nokey.json")


def job(tmp_path: Path) -> tuple[remote.Hosts, remote.JobFiles]:
    hosts = remote.load_hosts(hosts_file(tmp_path))
    root = tmp_path / "night"
    files = remote.write_job_files(root, hosts, samples=2)
    remote.write_slots(hosts, hosts.hosts, files)
    return hosts, files


def test_the_avocado_config_and_slots(tmp_path: Path) -> None:
    _, files = job(tmp_path)
    cfg = configparser.ConfigParser()  # as Avocado reads it (with interpolation)
    cfg.read(files.config)
    slots = ast.literal_eval(cfg["spawner.remote"]["slots"])
    assert [Path(s).name for s in slots] == ["slot-kvm-a.json", "slot-kvm-b.json"]
    hook = cfg["spawner.remote"]["setup_hook"]
    assert hook == "cd /srv/apflab && . .venv/bin/activate && apflab cleanup"
    assert cfg["run"]["status_server_auto"] == "False"
    assert cfg["run"]["status_server_uri"] == "127.0.0.1:28888"
    assert cfg["run"]["status_server_listen"] == f"127.0.0.1:{files.listen_port}"
    assert cfg["run"]["max_parallel_tasks"] == "2"
    assert ast.literal_eval(cfg["plugins"]["disable"]) == ["test.post.apflab-cleanup"]
    slot = json.loads(Path(slots[0]).read_text())
    assert oct(Path(slots[0]).stat().st_mode & 0o777) == "0o600"
    assert slot["user_known_hosts_file"] == str(files.known_hosts)
    assert "-R 127.0.0.1:28888:127.0.0.1:" in slot["extra_cmdline"]
    assert files.known_hosts.read_text().splitlines()[0] == f"apflab-kvm-a {HOST_KEY}"
    assert files.samples.read_text().startswith("apflab_sample: !mux\n  s1:\n")


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client")
def test_our_host_key_checking_wins_over_aexpects(tmp_path: Path) -> None:
    """aexpect builds `ssh EXTRA -o UserKnownHostsFile=F -o StrictHostKeyChecking=no
    -p P -i KEY user@host`; ssh keeps the first value: ours (ssh -G connects nowhere)."""
    _, files = job(tmp_path)
    slot = json.loads((files.dir / "slot-kvm-a.json").read_text())
    argv = ["ssh", "-G", *slot["extra_cmdline"].split()]
    argv += ["-o", f"UserKnownHostsFile={slot['user_known_hosts_file']}"]
    argv += ["-o", "StrictHostKeyChecking=no", "-p", slot["port"], "root@127.0.0.1"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    config = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    assert config["stricthostkeychecking"] == "true"
    assert config["hostkeyalias"] == "apflab-kvm-a"
    assert config["userknownhostsfile"] == str(files.known_hosts)
    assert config["batchmode"] == "yes"


def test_the_job_runs_samples_before_the_matrix(tmp_path: Path) -> None:
    _, files = job(tmp_path)
    argv = remote.avocado_argv(files, tmp_path / "m.yaml")
    assert argv[argv.index("run") + 1] == "--spawner=remote"
    assert argv[-4:] == [remote.TEST, "-m", str(files.samples), str(tmp_path / "m.yaml")]


def test_variant_ids_name_the_cells_of_the_matrix(tmp_path: Path) -> None:
    _, files = job(tmp_path)
    matrix = tmp_path / "m.yaml"
    matrix.write_text(MATRIX)
    variants = remote.variant_cells(matrix, files.samples)
    assert len(variants) == 4
    assert {v.cell for v in variants.values()} == {c.name for c in matrix_mod.cells_of(matrix)}
    assert sorted((v.cell, v.sample) for v in variants.values()) == [
        ("late_ack", 1),
        ("late_ack", 2),
        ("unpatched", 1),
        ("unpatched", 2),
    ]
    # the ids `avocado variants -m SAMPLES MATRIX` prints: path names, a hash of the values
    assert "run-apflab_sample-s1-kernel-unpatched-2b46" in variants


def _runs_ssh(shell: int) -> bool:
    """The shell has a child and it is the (pretend) ssh, exec'd."""
    children = remote._children(shell)
    try:
        return bool(children) and all(
            Path(f"/proc/{c}/cmdline").read_bytes().split(b"\0")[0] == b"ssh" for c in children
        )
    except OSError:
        return False


def test_left_over_sessions_are_closed_and_nothing_else(tmp_path: Path) -> None:
    _, files = job(tmp_path)
    marker = f"UserKnownHostsFile={files.known_hosts}"
    sleeper = f'{sys.executable} -c "import time; time.sleep(60)"'
    shell = subprocess.Popen(["bash", "-c", f"exec -a ssh {sleeper} {marker} & wait"])
    other = subprocess.Popen(["bash", "-c", f"exec -a ssh {sleeper} -o other & wait"])
    try:
        for s in (shell, other):
            d = files.sessions / f"aexpect_{s.pid}"
            d.mkdir()
            (d / "shell-pid").write_text(f"{s.pid}\n")
        # until each shell's child has exec'd (before, it is a forked bash: a busy
        # machine widens that window, and the test then failed once with a lab up)
        deadline = time.monotonic() + 10
        while not all(_runs_ssh(s.pid) for s in (shell, other)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert remote.close_sessions(files) == 1
        assert shell.wait(timeout=10) == 0  # its ssh ended, so did it
        assert other.poll() is None
    finally:
        for child in remote._children(other.pid):
            os.kill(child, 15)
        other.wait(timeout=10)


def fake_run(d: Path, run_id: str, machine: str) -> None:
    d.mkdir(parents=True)
    doc = {
        "run_id": run_id,
        "verdict": "PASS",
        "reason": "ok",
        "events": {"not_present": 10},
        "kernel": {"release": "6.1.0"},
        "apflab": {"machine": machine, "started_at": "2026-12-02T03:00:00Z"},
        "latency_us": {"ready_to_ack": {"p50": 3.0, "p99": 9.0}},
    }
    (d / "verdict.json").write_text(json.dumps(doc))


def test_fetched_runs_are_laid_out_and_stored_once(tmp_path: Path) -> None:
    root = tmp_path / "night"
    fetched = root / "remote" / "fetched"
    variants = {"v-a-1": remote.Variant("unpatched", 1), "v-b-1": remote.Variant("late_ack", 1)}
    tests = {
        "1-t_unpatched": remote.TestOutcome("1-t.py:T.t;v-a-1", "PASS", ""),
        "2-t_late": remote.TestOutcome("2-t.py:T.t;v-b-1", "PASS", ""),
        "3-t_lost": remote.TestOutcome("3-t.py:T.t;v-b-1", "ERROR", "ssh went away"),
    }
    fake_run(fetched / "kvm-a" / "1-t_unpatched" / "data" / "apf-1-42", "apf-1-42", "kvm-a")
    fake_run(fetched / "kvm-b" / "2-t_late" / "data" / "apf-1-42", "apf-1-42", "kvm-b")
    (fetched / "kvm-b" / "2-t_late" / "data" / "latest").symlink_to("apf-1-42")
    store = Store.open(str(tmp_path / "apflab.db"))
    try:
        runs = remote.collect_runs(root, fetched, tests, variants, store, "n1")
        rows = store.history()
    finally:
        store.close()
    assert [(r["cell"], r["host"], r["verdict"]) for r in runs] == [
        ("late_ack", "kvm-b", "PASS"),
        ("late_ack", None, "ERROR"),
        ("unpatched", "kvm-a", "PASS"),
    ]
    assert "ssh went away" in runs[1]["reason"]
    assert (root / "unpatched" / "apf-1-42" / "verdict.json").is_file()
    assert (root / "late_ack" / "apf-1-42" / "verdict.json").is_file()
    assert sorted((r["host"], r["kernel"], r["night"]) for r in rows) == [
        ("kvm-a", "unpatched", "n1"),
        ("kvm-b", "late_ack", "n1"),
    ]
    cells = [nightly.Cell(n, None) for n in ("missing", "unpatched")]
    out = remote.compare_tonight(root, cells, "missing")
    assert out == {
        "missing": {"verdict": "FAIL", "reason": "no run of this cell came back", "report": None}
    }
