"""Small helpers against the plain-Python expressions they stand for."""
import enum

import pytest

from meshserve.utils import all_ints


class Small(enum.IntEnum):
    A = 1


@pytest.mark.parametrize("xs", [[], [1, 2], [1, True], [1, 2.0], [Small.A, 3], ["a"], [None, 1], (5, 6),
                                range(3)], ids=repr)
def test_all_ints_equals_isinstance_over_every_element(xs):
    assert all_ints(xs) == all(isinstance(x, int) for x in xs)


def test_progress_bars_in_a_log_redraw_every_30_s_and_on_a_terminal_as_tqdm_does(monkeypatch):
    import io
    import sys

    from tqdm import tqdm

    from meshserve.progress import progress_bar

    class Tty(io.StringIO):
        def isatty(self):
            return True

    # a pipe or a log file: each redraw would be a line, so at most one every 30 s
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bar = progress_bar(total=3, file=io.StringIO())
    assert bar.mininterval == 30.0
    bar.close()
    bar = progress_bar(total=3, file=io.StringIO(), mininterval=1.0)  # an explicit value wins
    assert bar.mininterval == 1.0
    bar.close()
    monkeypatch.setattr(sys, "stderr", Tty())
    bar, ref = progress_bar(total=3, file=io.StringIO()), tqdm(total=3, file=io.StringIO())
    assert bar.mininterval == ref.mininterval
    bar.close(), ref.close()
