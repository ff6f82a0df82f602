"""The collector's thresholds while runs go on: the process's setting."""

import gc
from collections.abc import Iterator

import pytest

from etl import garbage


@pytest.fixture(autouse=True)
def thresholds() -> Iterator[tuple[int, int, int]]:
    found = gc.get_threshold()
    yield found
    gc.set_threshold(*found)


def test_overlapping_runs_put_back_what_the_first_found() -> None:
    gc.set_threshold(700, 11, 12)
    first, second = garbage.looking_less_often(), garbage.looking_less_often()

    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert gc.get_threshold() == (garbage.YOUNG_LOOK_EVERY, 11, 12)
    second.__exit__(None, None, None)

    assert gc.get_threshold() == (700, 11, 12)


@pytest.mark.parametrize("youngest", [0, 50_000])
def test_a_threshold_of_zero_or_a_rarer_one_is_left_as_it_is(youngest: int) -> None:
    gc.set_threshold(youngest, 10, 10)

    with garbage.looking_less_often():
        assert gc.get_threshold() == (youngest, 10, 10)

    assert gc.get_threshold() == (youngest, 10, 10)


def test_a_run_that_fails_puts_the_thresholds_back() -> None:
    gc.set_threshold(700, 10, 10)

    with pytest.raises(RuntimeError), garbage.looking_less_often():
        raise RuntimeError("the run failed")

    assert gc.get_threshold() == (700, 10, 10)
