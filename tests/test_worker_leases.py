"""The arbitration every lease registry shares: turns by priority then age, quotas per tenant, fencing tokens."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gridboost.worker_leases import Arbiter, fits, quota_text, total


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ticket(lease_id: str, priority: int, at: float, *, tenant: str = "t", cpu: float = 1.0) -> dict[str, Any]:
    return {
        "id": lease_id,
        "owner": "host:1",
        "tenant": tenant,
        "priority": priority,
        "requested_at": at,
        "amounts": {"cpu": cpu},
        "preemptible": False,
    }


def test_the_highest_priority_then_the_oldest_ticket_has_the_turn() -> None:
    """LOW, NORMAL, CRITICAL asked in that order are served CRITICAL, NORMAL, LOW; equals by age."""
    arbiter = Arbiter(clock=Clock())
    low, normal, critical = ticket("low", 0, 1.0), ticket("normal", 1, 2.0), ticket("critical", 3, 3.0)
    for t in (low, normal, critical):
        arbiter.ask(t, [])
    order = []
    while arbiter.pending:
        turns = [lid for lid, t in list(arbiter.pending.items()) if arbiter.ask(t, [])["status"] == "turn"]
        assert len(turns) == 1
        order.append(turns[0])
        arbiter.leave(turns[0])
    assert order == ["critical", "normal", "low"]
    arbiter.ask(ticket("late", 1, 9.0), [])
    assert arbiter.ask(ticket("early", 1, 5.0), []) == {"status": "turn"}
    assert arbiter.ask(ticket("late", 1, 9.0), []) == {"status": "wait", "ahead": 1}


def test_a_ticket_keeps_its_place_and_a_stale_one_goes() -> None:
    """A refresh keeps the first ``requested_at``; a ticket not refreshed for ``stale`` seconds stops holding others."""
    clock = Clock()
    arbiter = Arbiter(stale=5.0, clock=clock)
    arbiter.ask(ticket("first", 1, 1.0), [])
    assert arbiter.ask(ticket("second", 1, 2.0), [])["status"] == "wait"
    arbiter.ask(ticket("first", 1, 50.0), [])  # the owner's refresh does not move it back
    assert arbiter.pending["first"]["requested_at"] == 1.0
    clock.now += 4.0
    assert arbiter.ask(ticket("second", 1, 2.0), [])["status"] == "wait"
    clock.now += 2.0  # "first" was last seen 6 s ago
    assert arbiter.ask(ticket("second", 1, 2.0), []) == {"status": "turn"}
    assert "first" not in arbiter.pending


def test_a_quota_holds_back_its_tenant_only() -> None:
    """Over its quota a tenant's request waits with the quota and use in the answer; another tenant's goes on."""
    arbiter = Arbiter(clock=Clock())
    arbiter.set_quota("team-a", {"cpu": 2.0})
    granted = [{"tenant": "team-a", "amounts": {"cpu": 1.0}}, {"tenant": "team-a", "amounts": {"cpu": 1.0}}]
    held = arbiter.ask(ticket("a3", 3, 1.0, tenant="team-a"), granted)
    assert held == {
        "status": "quota",
        "why": "tenant 'team-a' is over its quota: quota cpu=2, in use cpu=2, asked cpu=1",
    }
    # A held-back ticket holds back no one, even at a higher priority.
    assert arbiter.ask(ticket("b1", 0, 2.0, tenant="team-b"), granted) == {"status": "turn"}
    assert arbiter.ask(ticket("a3", 3, 1.0, tenant="team-a"), granted[:1]) == {"status": "turn"}
    assert arbiter.quota_rows(granted) == [{"tenant": "team-a", "quota": {"cpu": 2.0}, "used": {"cpu": 2.0}}]
    arbiter.set_quota("team-a", None)
    assert arbiter.over_quota("team-a", {"cpu": 99.0}, granted) == ""


def test_tokens_increase_across_a_restart() -> None:
    """Each token is larger than the last; a new arbiter (a restarted registry) still issues larger ones."""
    clock = Clock()
    arbiter = Arbiter(clock=clock)
    tokens = [arbiter.token() for _ in range(1_000)]
    assert tokens == sorted(set(tokens))
    clock.now += 1e-3
    assert Arbiter(clock=clock).token() > tokens[-1]


def test_waiting_lists_tickets_in_serving_order_with_time_waited() -> None:
    clock = Clock(100.0)
    arbiter = Arbiter(clock=clock)
    arbiter.ask(ticket("low", 0, 90.0), [])
    arbiter.ask(ticket("high", 2, 95.0), [])
    assert [(t["id"], t["waited"]) for t in arbiter.waiting()] == [("high", 5.0), ("low", 10.0)]


def test_amount_helpers() -> None:
    assert fits({"cpu": 2.0}, {"cpu": 2.0, "gpu": 1.0}) and not fits({"gpu": 1.0}, {"cpu": 8.0})
    assert total([{"amounts": {"cpu": 1.0}}, {"amounts": {"cpu": 2.0, "gpu": 1.0}}]) == {"cpu": 3.0, "gpu": 1.0}
    assert quota_text({"memory": 2.0 * 2**30, "cpu": 8.0}) == "cpu=8,memory=2GiB"
    assert quota_text({}) == "nothing"


@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 20), st.sampled_from(["a", "b"]), st.integers(1, 3)),
        min_size=1,
        max_size=12,
    )
)
def test_exactly_the_first_ticket_not_held_back_has_the_turn(specs: list[tuple[int, int, str, int]]) -> None:
    """Whatever the mix, only the best (priority, age) ticket within quota is told to go, and none over quota."""
    arbiter = Arbiter(clock=Clock())
    arbiter.set_quota("a", {"cpu": 2.0})
    tickets = [
        ticket(f"t{i}", p, float(at), tenant=tenant, cpu=float(cpu)) for i, (p, at, tenant, cpu) in enumerate(specs)
    ]
    answers = {t["id"]: arbiter.ask(t, []) for t in tickets}
    answers = {t["id"]: arbiter.ask(t, []) for t in tickets}  # second round: every ticket is known
    within = [t for t in tickets if not (t["tenant"] == "a" and t["amounts"]["cpu"] > 2.0)]
    turns = [lid for lid, answer in answers.items() if answer["status"] == "turn"]
    if within:
        best = min(within, key=lambda t: (-t["priority"], t["requested_at"], t["id"]))
        assert turns == [best["id"]]
    else:
        assert turns == []
    assert {lid for lid, answer in answers.items() if answer["status"] == "quota"} == {
        t["id"] for t in tickets if t not in within
    }


def lease(
    lease_id: str, priority: int, cpu: float, *, owner: str = "other:1", at: float = 0.0, **more: Any
) -> dict[str, Any]:
    return {
        "id": lease_id,
        "owner": owner,
        "priority": priority,
        "amounts": {"cpu": cpu},
        "preemptible": True,
        "state": "active",
        "granted_at": at,
        **more,
    }


def frees_cpu(needed: float, free: float = 0.0) -> Any:
    return lambda chosen: free + sum(r["amounts"]["cpu"] for r in chosen) >= needed


def test_victims_are_the_fewest_lowest_priority_preemptible_leases_of_other_owners() -> None:
    """LOW before NORMAL, the youngest first among equals, and no more than needed; never the requester's own, a
    non-preemptible one, one of equal or higher priority, or one already being taken back."""
    critical = ticket("critical", 3, 0.0, cpu=2.0)
    granted = [
        lease("normal", 1, 2.0),
        lease("low-old", 0, 1.0, at=1.0),
        lease("low-young", 0, 1.0, at=2.0),
        lease("mine", 0, 8.0, owner="host:1"),
        lease("firm", 0, 8.0, preemptible=False),
        lease("equal", 3, 8.0),
        lease("going", 0, 8.0, state="preempting"),
    ]
    assert [r["id"] for r in Arbiter.victims(critical, granted, frees_cpu(1.0)) or []] == ["low-young"]
    assert [r["id"] for r in Arbiter.victims(critical, granted, frees_cpu(2.0)) or []] == ["low-young", "low-old"]
    # Two LOW leases are not enough for 4 CPUs; with the NORMAL one they are more than enough, and one LOW is needless.
    assert [r["id"] for r in Arbiter.victims(critical, granted, frees_cpu(3.0)) or []] == ["low-young", "normal"]
    assert Arbiter.victims(critical, granted, frees_cpu(5.0)) is None
    assert Arbiter.victims(ticket("low", 0, 0.0), granted, frees_cpu(1.0)) is None


# -- at scale: the line and the quota sums are kept as they change, never recounted -----------------------------------


def test_running_quota_sums_follow_hold_and_unhold() -> None:
    """What :meth:`Arbiter.hold` counts is what a quota sees, replaced on a second hold and gone after ``unhold``;
    once a tenant holds nothing, its use is exactly nothing (no rounding left over)."""
    arbiter = Arbiter(clock=Clock())
    arbiter.set_quota("a", {"cpu": 1.0})
    for i in range(10):
        arbiter.hold(f"l{i}", "a", {"cpu": 0.1})
    assert abs(arbiter.used("a")["cpu"] - 1.0) < 1e-9
    assert arbiter.ask(ticket("next", 1, 1.0, tenant="a", cpu=0.1))["status"] == "quota"
    arbiter.hold("l0", "a", {"cpu": 0.05})  # held again: counted once, with its new amounts
    assert abs(arbiter.used("a")["cpu"] - 0.95) < 1e-9
    assert arbiter.ask(ticket("smaller", 1, 1.0, tenant="a", cpu=0.05)) == {"status": "turn"}
    for i in range(10):
        arbiter.unhold(f"l{i}")
    arbiter.unhold("never-held")
    assert arbiter.used("a") == {} and arbiter.quota_rows() == [{"tenant": "a", "quota": {"cpu": 1.0}, "used": {}}]


def test_head_names_the_ticket_whose_turn_it_is() -> None:
    """``head`` is the first ticket in line that no quota holds back; ``held_back`` the ones a quota holds;
    ``to_wake`` both."""
    arbiter = Arbiter(clock=Clock())
    assert arbiter.head() is None
    arbiter.set_quota("a", {"cpu": 1.0})
    arbiter.ask(ticket("big", 3, 1.0, tenant="a", cpu=2.0))  # over its quota: in no line
    arbiter.ask(ticket("low", 0, 2.0))
    arbiter.ask(ticket("high", 2, 3.0))
    assert arbiter.head() == "high" and arbiter.held_back() == ["big"]
    assert arbiter.to_wake() == ["high", "big"]  # what a registry wakes when something changes
    arbiter.leave("high")
    assert arbiter.head() == "low"
    arbiter.set_quota("a", None)
    assert arbiter.ask(ticket("big", 3, 1.0, tenant="a", cpu=2.0)) == {"status": "turn"}
    assert arbiter.head() == "big" and arbiter.held_back() == []


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("ask"), st.integers(0, 7), st.integers(0, 3), st.sampled_from(["a", "b"]), st.integers(1, 3)),
        st.tuples(st.just("leave"), st.integers(0, 7)),
        st.tuples(st.just("hold"), st.integers(0, 5), st.sampled_from(["a", "b"]), st.integers(1, 3)),
        st.tuples(st.just("unhold"), st.integers(0, 5)),
        st.tuples(st.just("quota"), st.sampled_from(["a", "b"]), st.sampled_from([None, 1, 2, 4])),
    ),
    max_size=40,
)


@given(_OPS)
def test_the_kept_line_and_sums_answer_as_counting_everything_would(ops: list[tuple[Any, ...]]) -> None:
    """Whatever the order of asks, leaves, holds and quota changes, every answer is the one a count over every ticket
    and every granted lease gives (what the arbiter did before it kept a sorted line and running sums)."""
    arbiter = Arbiter(clock=Clock())
    tickets: dict[str, dict[str, Any]] = {}  # the first ask of each waiting ticket, and what held it back last
    granted: dict[str, dict[str, Any]] = {}
    quotas: dict[str, dict[str, float]] = {}

    def key(t: dict[str, Any]) -> tuple[int, float, str]:
        return (-t["priority"], t["requested_at"], t["id"])

    for step, op in enumerate(ops):
        if op[0] == "ask":
            _, n, priority, tenant, cpu = op
            mine = tickets.setdefault(f"t{n}", ticket(f"t{n}", priority, float(step), tenant=tenant, cpu=float(cpu)))
            answer = arbiter.ask(ticket(f"t{n}", priority, float(step), tenant=tenant, cpu=float(cpu)))
            assert answer == arbiter.ask(mine, list(granted.values()))  # the running sums agree with a count
            used = total(g for g in granted.values() if g["tenant"] == mine["tenant"])
            quota = quotas.get(mine["tenant"])
            over = quota is not None and not fits(
                {k: used.get(k, 0.0) + mine["amounts"].get(k, 0.0) for k in quota}, quota
            )
            mine["held"] = over
            ahead = sum(1 for t in tickets.values() if not t.get("held") and key(t) < key(mine))
            expected = "quota" if over else "wait" if ahead else "turn"
            assert answer["status"] == expected
            if expected == "wait":
                assert answer["ahead"] == ahead
        elif op[0] == "leave":
            tickets.pop(f"t{op[1]}", None)
            arbiter.leave(f"t{op[1]}")
        elif op[0] == "hold":
            _, n, tenant, cpu = op
            granted[f"g{n}"] = {"tenant": tenant, "amounts": {"cpu": float(cpu)}}
            arbiter.hold(f"g{n}", tenant, {"cpu": float(cpu)})
        elif op[0] == "unhold":
            granted.pop(f"g{op[1]}", None)
            arbiter.unhold(f"g{op[1]}")
        else:
            _, tenant, cap = op
            if cap is None:
                quotas.pop(tenant, None)
            else:
                quotas[tenant] = {"cpu": float(cap)}
            arbiter.set_quota(tenant, None if cap is None else {"cpu": float(cap)})
        line = [t for t in tickets.values() if not t.get("held")]
        assert arbiter.head() == (min(line, key=key)["id"] if line else None)
        assert sorted(arbiter.held_back()) == sorted(t["id"] for t in tickets.values() if t.get("held"))
        for tenant in ("a", "b"):
            counted = total(g for g in granted.values() if g["tenant"] == tenant)
            assert arbiter.used(tenant) == {k: v for k, v in counted.items() if v}


def test_a_stale_ticket_that_asks_again_before_a_sweep_is_queued_anew() -> None:
    """Asks sweep now and then, not each time; a ticket stale by then still goes as a sweep would have it: asked again,
    it is a new ticket (its place from the ``requested_at`` it brings), and it does not keep what held it back."""
    clock = Clock()
    arbiter = Arbiter(stale=5.0, clock=clock)
    arbiter.ask(ticket("first", 1, 1.0), [])
    clock.now += 4.9
    assert arbiter.ask(ticket("second", 1, 2.0), [])["status"] == "wait"  # swept here: "first" is live
    clock.now += 0.3  # "first" last seen 5.2 s ago; the last sweep was 0.3 s ago
    assert arbiter.ask(ticket("first", 1, 3.0), []) == {"status": "wait", "ahead": 1}
    assert arbiter.pending["first"]["requested_at"] == 3.0 and arbiter.head() == "second"
