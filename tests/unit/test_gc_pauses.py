"""The serving processes freeze their startup heap out of garbage collection and time every
collection (meshserve.utils.GCPauses)."""
import gc
import logging
import weakref

from meshserve.utils import GCPauses


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
        with caplog.at_level(logging.WARNING, logger="meshserve.gc"):
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
        with caplog.at_level(logging.WARNING, logger="meshserve.gc"):
            gc.collect()
    finally:
        mon.uninstall()
    assert mon.count >= 1 and not caplog.records
