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
