"""The five trace invariants, checked on a finished :class:`~apflab.analysis.model.Analysis`.

Each one is an :class:`~apflab.analysis.model.Invariant`: whether it held, and a
one-line detail with the numbers behind the answer.  Their names and details
are read by the verdict, the reports and other tools.
"""

from __future__ import annotations

from apflab.analysis.model import (
    CLASSIFICATION_PF,
    MAX_OUTSTANDING_PER_VCPU,
    Analysis,
    Invariant,
)


def check_invariants(analysis: Analysis) -> dict[str, Invariant]:
    """All trace invariants by name, in the verdict.json order."""
    return {
        "every_not_present_readied": every_not_present_readied(analysis),
        "no_ready_for_unknown_token": no_ready_for_unknown_token(analysis),
        "outstanding_per_vcpu_le_64": outstanding_per_vcpu_le_64(analysis),
        "token_vcpu_id_matches": token_vcpu_id_matches(analysis),
        "interrupt_ready_acked_before_next": interrupt_ready_acked_before_next(analysis),
    }


def format_duration(us: int) -> str:
    """``1.500 s`` from one second on, else ``12.3 ms``."""
    return f"{us / 1e6:.3f} s" if us >= 1_000_000 else f"{us / 1e3:.1f} ms"


def _first_example(analysis: Analysis, problem: str) -> str:
    examples = analysis.examples.get(problem)
    return f"; e.g. {examples[0]}" if examples else ""


def every_not_present_readied(a: Analysis) -> Invariant:
    """No token outstanding at the end for longer than the grace, none re-announced."""
    ev, grace = a.events, a.grace_us
    old = [o for o in a.outstanding_at_end if o.age_us > grace]
    young = len(a.outstanding_at_end) - len(old)
    readied = ev["not_present"] - ev["outstanding_at_end"] - ev["flushed"]
    readied -= ev["duplicate_not_present"]
    detail = (
        f"{ev['not_present']} not_present: {readied} readied, {ev['flushed']} flushed by a "
        f"wake-all, {len(a.outstanding_at_end)} outstanding at the end "
        f"({len(old)} older than the {format_duration(grace)} grace)"
    )
    if ev["duplicate_not_present"]:
        detail += f", {ev['duplicate_not_present']} re-announced while outstanding"
        detail += _first_example(a, "duplicate_not_present")
    if old:
        o = old[0]
        detail += (
            f"; oldest: token {o.token:#x} on vCPU {o.vcpu} (pid {o.pid}) outstanding "
            f"{format_duration(o.age_us)}{' after its page completed' if o.completed else ''}"
        )
    elif young:
        detail += " (censored, within grace)"
    return Invariant(not old and not ev["duplicate_not_present"], detail)


def no_ready_for_unknown_token(a: Analysis) -> Invariant:
    """Every ready (but a wake-all) is for a token outstanding on that vCPU."""
    ev = a.events
    n = ev["unknown_ready"]
    return Invariant(
        n == 0,
        f"{n} of {ev['ready']} readies for a token never announced on that vCPU "
        f"({ev['wake_all']} wake-all 0xffffffff excluded){_first_example(a, 'unknown_ready')}",
    )


def outstanding_per_vcpu_le_64(a: Analysis) -> Invariant:
    """No vCPU ever has more than ``ASYNC_PF_PER_VCPU`` tokens outstanding."""
    per = ", ".join(f"{s.label} {s.max_outstanding}" for s in a.vcpus) or "no vCPU"
    over = [s for s in a.vcpus if s.max_outstanding > MAX_OUTSTANDING_PER_VCPU]
    return Invariant(
        not over, f"max outstanding per vCPU (limit {MAX_OUTSTANDING_PER_VCPU}): {per}"
    )


def token_vcpu_id_matches(a: Analysis) -> Invariant:
    """Every token is non-zero with ``token & 0xfff`` = its vCPU id; no two threads
    share an id."""
    bad = a.events["bad_token"]
    ids = [s.vcpu for s in a.vcpus if s.vcpu is not None]
    clash = len(ids) != len(set(ids))
    how = (
        "vCPU ids from the pid map"
        if a.vcpu_ids == "map"
        else "no pid→vCPU map: vCPU ids inferred from token & 0xfff of each thread's "
        "first not_present, so only consistency is checked"
    )
    detail = (
        f"{bad} of {a.events['not_present']} tokens are 0 or have token & 0xfff != vCPU id ({how})"
    )
    if clash:
        detail += "; two threads share one vCPU id"
    return Invariant(bad == 0 and not clash, detail + _first_example(a, "bad_token"))


def interrupt_ready_acked_before_next(a: Analysis) -> Invariant:
    """Every interrupt-delivered ready is ACKed, and before the next one is
    delivered (the ordering quirk aside; see :mod:`apflab.analysis.acks`)."""
    ev, grace = a.events, a.grace_us
    old_unacked = [u for u in a.unacked_at_end if u.age_us > grace]
    back_to_back = ev["back_to_back"]
    parts = [
        f"{ev['interrupt_ready']} interrupt-path readies + {ev['wake_all']} wake-all, "
        f"{ev['ack']} ACKs ({ev['ack_unmatched']} with no ready pending)",
        f"{ev['ack_triggered_ready']} readies logged just before the ACK that dequeued them "
        "(ordering quirk, not back-to-back)",
    ]
    if a.classification == CLASSIFICATION_PF:
        parts.append(f"{back_to_back} back-to-back (delivered before the previous one was ACKed)")
        ok = back_to_back == 0
    else:
        parts.append("back-to-back not assessed: classification heuristic (no #PF events)")
        ok = True
    parts.append(
        f"{len(a.unacked_at_end)} never ACKed ({len(old_unacked)} older than "
        f"{format_duration(grace)})"
    )
    if ev["unacked_written_off"]:
        parts.append(f"{ev['unacked_written_off']} written off un-ACKed (queue cap)")
    ok = ok and not old_unacked and not ev["unacked_written_off"]
    return Invariant(ok, "; ".join(parts) + _first_example(a, "back_to_back"))
