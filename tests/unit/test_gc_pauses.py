"""The serving processes freeze their startup heap out of garbage collection and time every
collection (meshserve.utils.GCPauses); the long ones are logged at INFO, at most one line per 30 s
(meshserve.utils.RateLimitedLog)."""
import gc
import logging
import weakref

from meshserve.utils import GCPauses, RateLimitedLog


class _Node:
    pass


def _cycle():
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return a


def test_freeze_exempts_startup_objects_from_later_collections():
    alive = _cycle()
    ref = weakref.ref(alive)
    try:
        assert GCPauses.freeze() > 0
        del alive  # the cycle is garbage now, but frozen: a full collection must not scan it
        gc.collect()
        assert ref() is not None
        gc.unfreeze()
        gc.collect()
        assert ref() is None  # the same cycle goes once it is back in the collected generations
    finally:
        gc.unfreeze()


def test_every_collection_is_timed_and_a_long_one_is_logged(caplog):
    mon = GCPauses("test", warn_ms=1e-6).install()
    try:
        with caplog.at_level(logging.INFO, logger="meshserve.gc"):
            _cycle()
            gc.collect()
    finally:
        mon.uninstall()
    assert mon.count >= 1 and mon.total_s > 0 and mon.max_s <= mon.total_s
    assert any("test: a generation-2 garbage collection paused the process" in r.getMessage()
               for r in caplog.records)
    n = mon.count
    gc.collect()
    assert mon.count == n  # uninstalled: no longer called


def test_a_zero_threshold_logs_nothing(caplog):
    mon = GCPauses("quiet", warn_ms=0).install()
    try:
        with caplog.at_level(logging.INFO, logger="meshserve.gc"):
            gc.collect()
    finally:
        mon.uninstall()
    assert mon.count >= 1 and not caplog.records


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_long_pauses_are_logged_once_per_interval_with_the_count_held_back(caplog):
    mon = GCPauses("busy", warn_ms=1e-6)
    clock = _Clock()
    mon._log = RateLimitedLog(logging.getLogger("meshserve.gc"), interval_s=30.0, clock=clock)
    mon.install()
    gc.disable()  # only the explicit collections below: no automatic ones in between
    try:
        with caplog.at_level(logging.INFO, logger="meshserve.gc"):
            for _ in range(5):
                gc.collect()
            clock.now += 29.0
            gc.collect()
            first = [r.getMessage() for r in caplog.records]
            clock.now += 1.5  # 30.5 s after the first line
            gc.collect()
    finally:
        gc.enable()
        mon.uninstall()
    lines = [r.getMessage() for r in caplog.records]
    assert len(first) == 1 and "busy: a generation-2 garbage collection" in first[0]
    assert len(lines) == 2 and all(r.levelno == logging.INFO for r in caplog.records)
    assert lines[1].endswith("(5 more like it in the previous 30 s not logged)"), lines[1]
    assert mon.count == 7


def test_nothing_is_logged_or_counted_when_info_is_off(caplog):
    log = RateLimitedLog(logging.getLogger("meshserve.test_quiet"), clock=_Clock())
    with caplog.at_level(logging.WARNING, logger="meshserve.test_quiet"):
        assert not log("x %d", 1) and not log("x %d", 2)
    assert not caplog.records and log.num_suppressed == 0
