"""choose_replica over fake slots: two choices, full replicas, multiplex affinity, fallback."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import pytest

from ladle._serving import choosers
from ladle._serving.choosers import choose_replica


@dataclass(eq=False)
class FakeSlot:
    name: str
    in_flight: int = 0
    capacity: int = 5
    model_ids: set[str] = field(default_factory=set)

    def __repr__(self) -> str:
        return f"{self.name}({self.in_flight}/{self.capacity} {sorted(self.model_ids)})"


@pytest.fixture
def seeded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the random picks reproducible."""
    monkeypatch.setattr(choosers, "_random", random.Random(1234).random)


def test_no_slots_or_only_full_slots_give_none() -> None:
    assert choose_replica([]) is None
    assert choose_replica([FakeSlot("a", in_flight=1, capacity=1)]) is None
    full = [FakeSlot(n, in_flight=3, capacity=3) for n in "abcd"]
    assert choose_replica(full) is None
    assert choose_replica(full, "model") is None


def test_single_slot_with_room_is_chosen() -> None:
    only = FakeSlot("a", in_flight=4, capacity=5)
    assert choose_replica([only]) is only
    assert choose_replica([only], "m") is only


def test_two_slots_pick_the_lower_in_flight(seeded: None) -> None:
    busy = FakeSlot("busy", in_flight=3)
    idle = FakeSlot("idle", in_flight=1)
    for slots in ([busy, idle], [idle, busy]):
        for _ in range(50):
            assert choose_replica(slots) is idle


def test_each_pair_picks_its_less_loaded_member(monkeypatch: pytest.MonkeyPatch) -> None:
    # Drive the two random draws so every ordered pair (i, j) is examined.
    slots = [FakeSlot(str(n), in_flight=load) for n, load in enumerate([4, 0, 2, 3, 1])]
    n = len(slots)
    seen_pairs = set()
    for i, j in itertools.permutations(range(n), 2):
        j_draw = j if j < i else j - 1  # the chooser skips index i when drawing j
        draws = iter([(i + 0.5) / n, (j_draw + 0.5) / (n - 1)])
        monkeypatch.setattr(choosers, "_random", lambda: next(draws))
        chosen = choose_replica(slots)
        expected = slots[i] if slots[i].in_flight <= slots[j].in_flight else slots[j]
        assert chosen is expected, (i, j, chosen)
        seen_pairs.add(frozenset((i, j)))
    assert len(seen_pairs) == n * (n - 1) // 2


def test_most_loaded_is_never_chosen_and_two_distinct_are_compared(seeded: None) -> None:
    slots = [FakeSlot("a", in_flight=0), FakeSlot("b", in_flight=2), FakeSlot("c", in_flight=4)]
    counts = {s.name: 0 for s in slots}
    for _ in range(600):
        chosen = choose_replica(slots)
        assert chosen is not None
        counts[chosen.name] += 1
    # Two distinct replicas are always compared, so the most loaded never wins,
    # and the least loaded wins every pair it is part of (2 of 3 pairs).
    assert counts["c"] == 0
    assert counts["a"] > counts["b"] > 0


def test_full_replicas_are_never_chosen(seeded: None) -> None:
    room = FakeSlot("room", in_flight=4, capacity=5)
    full = [FakeSlot(f"full{i}", in_flight=2, capacity=2) for i in range(5)]
    # The replica with room is the most loaded in absolute terms, yet the only choice.
    for k in range(len(full) + 1):
        slots = [*full[:k], room, *full[k:]]
        for _ in range(30):
            assert choose_replica(slots) is room
    several = [FakeSlot("x", 1, 1), FakeSlot("y", 0, 2), FakeSlot("z", 3, 3), FakeSlot("w", 1, 4)]
    for _ in range(200):
        chosen = choose_replica(several)
        assert chosen is not None and chosen.in_flight < chosen.capacity


def test_multiplex_affinity_is_preferred_over_load(seeded: None) -> None:
    holder = FakeSlot("holder", in_flight=4, capacity=5, model_ids={"m1"})
    idle = [FakeSlot(f"idle{i}", in_flight=0) for i in range(4)]
    slots = [idle[0], idle[1], holder, idle[2], idle[3]]
    for _ in range(50):
        assert choose_replica(slots, "m1") is holder


def test_multiplex_two_holders_pick_the_lower_in_flight(seeded: None) -> None:
    h1 = FakeSlot("h1", in_flight=3, model_ids={"m1", "m2"})
    h2 = FakeSlot("h2", in_flight=1, model_ids={"m1"})
    other = FakeSlot("other", in_flight=0, model_ids={"m2"})
    for _ in range(50):
        assert choose_replica([h1, other, h2], "m1") is h2


def test_multiplex_falls_back_when_holders_are_full(seeded: None) -> None:
    holder = FakeSlot("holder", in_flight=5, capacity=5, model_ids={"m1"})
    busy = FakeSlot("busy", in_flight=3)
    free = FakeSlot("free", in_flight=1)
    for _ in range(50):
        assert choose_replica([holder, busy, free], "m1") is free
    # Nobody else has room either: nothing is chosen.
    assert choose_replica([holder, FakeSlot("f", 5, 5)], "m1") is None


def test_multiplex_falls_back_when_nobody_holds_the_model(seeded: None) -> None:
    a = FakeSlot("a", in_flight=2, model_ids={"other"})
    b = FakeSlot("b", in_flight=0)
    for _ in range(50):
        assert choose_replica([a, b], "unknown") is b
    # Without a model id, the model a replica holds does not matter.
    for _ in range(50):
        assert choose_replica([a, b]) is b
