"""Events as the log keeps them: what one costs to hold."""

from __future__ import annotations

import tracemalloc

from turnstream import NewEvent


def test_a_short_event_is_held_in_about_its_own_size() -> None:
    # orjson writes into a 4 KiB buffer that its result keeps: held as it came, a turn of
    # short deltas cost ~4 KiB per event (a log, a live tail and readers all hold them).
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        events = [
            NewEvent.build(f"1.{n}", {"type": "text-delta", "delta": "w "}) for n in range(500)
        ]
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    held = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert len(events) == 500
    assert held / 500 < 1024, f"{held / 500:.0f} bytes per event"
