"""Every rule of PROTOCOL.md "Dispatch and escalation rules" against the pure engine, with a
fake clock. Each test names the rule it holds the engine to."""

from __future__ import annotations

import copy

import pytest

from dispatch.engine import commands as c
from dispatch.engine.events import IncidentEscalated, IncidentOffered
from dispatch.errors import Rejected
from tests.unit.enginekit import TIMING, H, Kit, roster


def offered_to(kit: Kit, inc: str) -> str | None:
    i = kit.state.incidents[inc]
    return i.responder if i.status == "offered" else None


@pytest.fixture
def kit() -> Kit:
    k = Kit.new()
    k.online("w1", 113.005, 22.605)  # V1A, nearest to the usual report point
    k.online("w2", 113.015, 22.615)  # V1A
    k.online("w3", 113.005, 22.635)  # V1B
    return k


# rule 1 --------------------------------------------------------------------------------------


def test_rule1_located_to_level3_and_boundary_counts_as_inside(kit: Kit) -> None:
    inc = kit.report(lon=113.02, lat=22.62)  # the corner of four basic grids
    grids = kit.state.incidents[inc].grids
    assert grids["1"] == "T0" and grids["3"] in {"V1A", "V1B", "V2A", "V2B"}
    with pytest.raises(Rejected) as err:
        kit.report(lon=114.5, lat=23.5)
    assert err.value.code == "outside_area"


def test_unknown_category_is_rejected_and_changes_nothing(kit: Kit) -> None:
    before = (kit.state.seq, len(kit.state.incidents))
    with pytest.raises(Rejected) as err:
        kit.report(category="nope")
    assert err.value.code == "unknown_category" and "nope" in err.value.message
    assert (kit.state.seq, len(kit.state.incidents)) == before


# rule 2 --------------------------------------------------------------------------------------


def test_rule2_handled_on_the_spot_is_closed_at_level3_at_once(kit: Kit) -> None:
    inc = kit.report(handled=True, actor="w1")
    i = kit.state.incidents[inc]
    assert (i.status, i.level, i.closed_level, i.handled, i.on_time) == ("closed", 3, 3, True, True)
    assert kit.types() == ["responder.presence"] * 3 + [
        "incident.reported",
        "incident.resolved",
        "incident.closed",
    ]
    assert kit.state.responders["w1"].status == "available"


# rule 3 --------------------------------------------------------------------------------------


def test_rule3_nearest_available_skilled_fresh_in_pool(kit: Kit) -> None:
    inc = kit.report()
    assert offered_to(kit, inc) == "w1"
    ev = next(e for e in kit.events if isinstance(e, IncidentOffered))
    assert ev.distance_m is not None and ev.distance_m < 200


def test_rule3_ties_go_to_the_smaller_id() -> None:
    k = Kit.new()
    k.online("w2", 113.010, 22.610)
    k.online("w1", 113.010, 22.610)
    inc = k.report(lon=113.010, lat=22.611)
    assert offered_to(k, inc) == "w1"


def test_rule3_level3_pool_is_the_basic_grid_only(kit: Kit) -> None:
    # w3 (V1B) is much nearer than any V1A worker, but the incident is in V1A
    kit.engine.position("w3", 113.010, 22.6201, kit.clock.now())
    inc = kit.report(lon=113.010, lat=22.6199)
    assert offered_to(kit, inc) in {"w1", "w2"}


def test_rule3_stale_position_and_missing_skill_are_not_eligible() -> None:
    k = Kit.new()
    k.online("w1", 113.005, 22.605)
    k.online("w2", 113.015, 22.615)
    k.clock.jump(TIMING.position_stale_after + 1)
    k.engine.position("w2", 113.015, 22.615, k.clock.now())
    inc = k.report()
    assert offered_to(k, inc) == "w2"  # w1's position is stale
    k.online("w4", 113.03, 22.61)  # V2A: sanitation only
    fire = k.report(lon=113.03, lat=22.611)
    # w4 lacks the skill: nobody at level 3 (nor 2), and w1 is stale at level 1
    assert [e.reason for e in k.state.incidents[fire].escalations] == ["no_responder"] * 2
    assert not any(isinstance(e, IncidentOffered) and e.responder in ("w1", "w4") for e in k.events)


def test_rule3_off_duty_and_offline_are_not_available(kit: Kit) -> None:
    kit.do(c.SetDuty("w1", "off_duty"))
    kit.do(c.Disconnect("w2"))
    kit.tick(TIMING.offline_after)
    assert kit.state.responders["w2"].status == "offline"
    inc = kit.report()
    assert kit.state.incidents[inc].level == 2
    assert offered_to(kit, inc) == "w3"


# rule 4 --------------------------------------------------------------------------------------


def test_rule4_decline_passes_on_and_never_back(kit: Kit) -> None:
    inc = kit.report()
    kit.do(c.Decline("w1", inc, "busy"))
    assert offered_to(kit, inc) == "w2"
    kit.do(c.Decline("w2", inc))
    # everyone eligible at level 3 declined → level 2 (reason declined), where w1/w2 may come back
    esc = [e for e in kit.events if isinstance(e, IncidentEscalated)]
    assert [(e.from_level, e.to_level, e.reason) for e in esc] == [(3, 2, "declined")]
    assert kit.state.incidents[inc].level == 2
    assert offered_to(kit, inc) == "w1"


def test_rule4_timeout_passes_on(kit: Kit) -> None:
    inc = kit.report()
    kit.tick(TIMING.offer_timeout - 0.001)
    assert offered_to(kit, inc) == "w1"
    kit.tick(0.002)
    assert offered_to(kit, inc) == "w2"
    revoked = [n for n in kit.notices if n.kind == "offer_revoked"]
    assert [(n.responder, n.reason) for n in revoked] == [("w1", "timeout")]


def test_rule4_nobody_holds_two_offers(kit: Kit) -> None:
    a = kit.report(ref="a")
    b = kit.report(ref="b")
    assert offered_to(kit, a) == "w1" and offered_to(kit, b) == "w2"
    kit.do(c.Accept("w1", a))
    with pytest.raises(Rejected) as err:
        kit.do(c.Assign(b, "w1", "op"))
    assert err.value.code == "conflict" and "assigned" in err.value.message


def test_accept_of_a_gone_offer_is_a_conflict(kit: Kit) -> None:
    inc = kit.report()
    kit.tick(TIMING.offer_timeout)
    with pytest.raises(Rejected) as err:
        kit.do(c.Accept("w1", inc))
    assert err.value.code == "conflict"


# rule 5 --------------------------------------------------------------------------------------


def reasons(kit: Kit) -> list[tuple[int, int, str]]:
    return [
        (e.from_level, e.to_level, e.reason) for e in kit.events if isinstance(e, IncidentEscalated)
    ]


def test_rule5_no_responder_escalates_up_to_the_town_and_waits() -> None:
    k = Kit.new()
    inc = k.report()
    assert reasons(k) == [(3, 2, "no_responder"), (2, 1, "no_responder")]
    i = k.state.incidents[inc]
    assert (i.level, i.status, i.responder) == (1, "new", None)
    k.tick(72 * H)
    assert k.state.incidents[inc].overdue is True
    assert k.types()[-1] == "incident.overdue"
    k.tick(72 * H)  # overdue is marked once
    assert k.types().count("incident.overdue") == 1


def test_rule5_sla_escalates_and_releases_the_assignee(kit: Kit) -> None:
    inc = kit.report()
    kit.do(c.Accept("w1", inc))
    assert kit.state.responders["w1"].status == "assigned"
    kit.clock.jump(2 * H - 1)
    for rid, (lon, lat) in {"w1": (113.005, 22.605), "w2": (113.015, 22.615)}.items():
        kit.engine.position(rid, lon, lat, kit.clock.now())
    kit.tick(1)  # fire_hazard: 2 h at level 3
    assert reasons(kit) == [(3, 2, "sla")]
    assert kit.state.responders["w1"].status in ("available", "offered")
    i = kit.state.incidents[inc]
    assert i.level == 2 and i.on_time is False
    assert i.deadline == pytest.approx(kit.clock.now() + 24 * H)


def test_rule5_requested_never_goes_back_to_the_asker(kit: Kit) -> None:
    inc = kit.report()
    kit.do(c.Accept("w1", inc))
    kit.do(c.RequestEscalation("w1", inc, "too big"))
    assert reasons(kit) == [(3, 2, "requested")]
    assert offered_to(kit, inc) == "w2"  # w1 is nearest but asked to escalate it
    kit.do(c.Decline("w2", inc))
    assert offered_to(kit, inc) == "w3"
    kit.do(c.Decline("w3", inc))
    assert kit.state.incidents[inc].level == 1
    assert offered_to(kit, inc) == "w2"  # level 1 again may offer w2, never w1


def test_rule5_operator_escalation_and_not_above_the_town(kit: Kit) -> None:
    inc = kit.report()
    kit.do(c.Escalate(inc, "op"))
    kit.do(c.Escalate(inc, "op"))
    assert reasons(kit) == [(3, 2, "operator"), (2, 1, "operator")]
    with pytest.raises(Rejected) as err:
        kit.do(c.Escalate(inc, "op"))
    assert err.value.code == "conflict"


# rule 6 --------------------------------------------------------------------------------------


def test_rule6_time_limits_per_category_and_level(kit: Kit) -> None:
    now = kit.clock.now()
    gas = kit.report(category="gas_leak", ref="g")
    san = kit.report(category="sanitation", ref="s")
    assert kit.state.incidents[gas].deadline == now + 1800
    assert kit.state.incidents[san].deadline == now + 24 * H


# rule 7 --------------------------------------------------------------------------------------


def test_rule7_resolved_closes_at_once_without_verification(kit: Kit) -> None:
    inc = kit.report()
    kit.do(c.Accept("w1", inc))
    kit.do(c.Arrive("w1", inc))
    assert kit.state.responders["w1"].status == "on_scene"
    kit.do(c.Resolve("w1", inc, "done"))
    i = kit.state.incidents[inc]
    assert (i.status, i.closed_level, i.on_time) == ("closed", 3, True)
    assert kit.state.responders["w1"].status == "available"


def test_rule7_verification_by_reporter_or_operator_not_the_fixer(kit: Kit) -> None:
    inc = kit.report(category="dispute", actor="w3")
    kit.do(c.Accept("w1", inc))
    kit.do(c.Resolve("w1", inc))
    assert kit.state.incidents[inc].status == "resolved"
    with pytest.raises(Rejected):
        kit.do(c.Verify("w1", inc))  # the fixer may not verify
    kit.do(c.Verify("w3", inc, "checked"))
    assert kit.state.incidents[inc].status == "closed"


def test_rule7_reopen_is_rework_dispatched_at_the_closing_level(kit: Kit) -> None:
    inc = kit.report()
    kit.do(c.Escalate(inc, "op"))
    kit.do(c.Close(inc, "op", note="false alarm"))
    with pytest.raises(Rejected):
        kit.do(c.Close(inc, "op"))
    kit.do(c.Reopen(inc, "op", note="it came back"))
    i = kit.state.incidents[inc]
    assert (i.reopened, i.level) == (1, 2)
    assert i.status == "offered"


# availability and operators -------------------------------------------------------------------


def test_offline_after_grace_passes_offers_on_at_once_but_reconnect_in_time_keeps(kit: Kit) -> None:
    inc = kit.report()
    kit.do(c.Disconnect("w1"))
    kit.tick(TIMING.offline_after - 1)
    kit.do(c.Connect("w1"))
    kit.tick(5)
    assert offered_to(kit, inc) == "w1"
    kit.do(c.Disconnect("w1"))
    kit.tick(TIMING.offline_after)
    assert offered_to(kit, inc) == "w2"
    assert kit.state.responders["w1"].status == "offline"


def test_an_offer_lost_to_going_offline_is_not_offered_back_at_the_next_level() -> None:
    """The only responder of a basic grid goes offline while holding its offer: the case passes
    on and escalates, and the village's pool must not find that responder available again."""
    k = Kit.new()
    k.online("w1", 113.005, 22.605)  # V1A; w2 never connects
    inc = k.report()
    assert offered_to(k, inc) == "w1"
    k.do(c.Disconnect("w1"))
    k.tick(TIMING.offline_after)
    i = k.state.incidents[inc]
    # nobody else is online: it climbs to the town and waits there for an operator
    assert (i.level, i.status, i.responder) == (1, "new", None)
    offers = [e for e in k.events if e.type_name() == "incident.offered"]
    assert [e.responder for e in offers] == ["w1"]
    assert k.state.responders["w1"].status == "offline"
    assert k.state.responders["w1"].incident is None


def test_hello_does_not_end_off_duty(kit: Kit) -> None:
    kit.do(c.SetDuty("w1", "off_duty"))
    kit.do(c.Disconnect("w1"))
    kit.tick(TIMING.offline_after)
    kit.do(c.Connect("w1"))
    assert kit.state.responders["w1"].status == "off_duty"
    kit.do(c.SetDuty("w1", "available"))
    assert kit.state.responders["w1"].status == "available"


def test_operator_scope_and_transfer_to_a_department() -> None:
    k = Kit.new()
    k.online("w1", 113.005, 22.605)
    k.online("d1", 113.02, 22.62)
    inc = k.report(category="dispute")
    with pytest.raises(Rejected) as err:
        k.do(c.Close(inc, "op2", scope="V2"))
    assert err.value.code == "forbidden"
    with pytest.raises(Rejected) as err:
        k.do(c.Transfer(inc, "nope", "op"))
    assert err.value.code == "not_found"
    k.do(c.Transfer(inc, "police", "op", scope="V1"))
    i = k.state.incidents[inc]
    assert i.department == "police" and offered_to(k, inc) == "d1"
    assert any(n.responder == "w1" and n.reason == "operator" for n in k.notices)


def test_rejections_leave_the_state_untouched(kit: Kit) -> None:
    inc = kit.report()
    before = copy.deepcopy((kit.state.seq, kit.state.incidents, kit.state.refs))
    for bad in (
        c.Accept("w2", inc),
        c.Arrive("w1", inc),
        c.Resolve("w2", inc),
        c.Reopen(inc, "op"),
        c.Assign(inc, "nobody", "op"),
        c.RequestEscalation("w3", inc),
    ):
        with pytest.raises(Rejected):
            kit.do(bad)
    assert copy.deepcopy((kit.state.seq, kit.state.incidents, kit.state.refs)) == before


def test_replay_rebuilds_the_same_state(kit: Kit) -> None:
    a = kit.report(ref="a")
    b = kit.report(ref="b", category="dispute")
    kit.do(c.Accept("w1", a))
    kit.do(c.Decline("w2", b))
    kit.tick(2 * H)
    fresh = Kit.new()
    fresh.engine.replay(kit.events)
    assert fresh.state.seq == kit.state.seq
    assert fresh.state.incidents == kit.state.incidents
    assert {r: x.status for r, x in fresh.state.responders.items()} == {
        r: x.status for r, x in kit.state.responders.items()
    }


def test_roster_kit_builds() -> None:
    assert set(roster()) >= {"w1", "d1"}
