"""apflab doctor: this host's real facts, then the same facts with one thing broken."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import apflab
from apflab.host.doctor import host_facts, problems


def test_each_broken_fact_is_one_problem_with_its_fix() -> None:
    facts = host_facts()
    base = {p.what for p in problems(facts)}
    cases = {
        "not root": lambda f: f.update(root=False),
        "missing tools: qemu-img": lambda f: f["tools"].update({"qemu-img": False}),
        "GiB free under": lambda f: f["disk_free_gb"]["runtime"].update(free=0),
    }
    for needle, breaks in cases.items():
        broken = copy.deepcopy(facts)
        breaks(broken)
        new = [p for p in problems(broken) if p.what not in base]
        assert len(new) == 1 and needle in new[0].what, (needle, new)
        assert new[0].fix


def test_a_direct_host_needs_async_pf_int_and_kvm_events() -> None:
    facts = copy.deepcopy(host_facts())
    facts.update(path="direct", kvm_events=False, cgroup={"version": 2, "parent": "/x"})
    facts["kvm"]["async_pf_int"] = 0
    found = " | ".join(p.what for p in problems(facts))
    assert "KVM_CAP_ASYNC_PF_INT" in found and "kvm async-PF events" in found


def test_the_lab_entry_point_prints_what_doctor_json_prints() -> None:
    """l1 runs ``python -m apflab.host.doctor`` at lab up instead of the CLI."""
    env = {**os.environ, "PYTHONPATH": str(Path(apflab.__file__).parents[1])}

    def doctor(*argv: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", *argv]
        return subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)

    light, cli = doctor("apflab.host.doctor"), doctor("apflab", "doctor", "--json")
    assert light.returncode == cli.returncode
    a, b = json.loads(light.stdout), json.loads(cli.stdout)
    for doc in (a, b):  # the one fact that moves between two calls
        doc.pop("mem_available_mb")
    assert a == b and "problems" in a
