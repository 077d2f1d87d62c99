"""The server's garbage collector settings reach the collector."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from service.app import tune_collector
from service.settings import ServerSettings


@pytest.fixture
def collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("collector")
def test_the_young_threshold_is_set_and_the_older_ones_kept() -> None:
    gc.set_threshold(700, 11, 12)
    tune_collector(ServerSettings(gc_threshold=12_345, gc_freeze=False))
    assert gc.get_threshold() == (12_345, 11, 12)
    assert gc.get_freeze_count() == 0


@pytest.mark.usefixtures("collector")
def test_none_keeps_pythons_threshold_and_freeze_moves_objects_out_of_reach() -> None:
    gc.set_threshold(700, 10, 10)
    tune_collector(ServerSettings(gc_threshold=None, gc_freeze=True))
    assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_freeze_count() > 0


def test_a_threshold_that_would_collect_all_the_time_is_refused() -> None:
    with pytest.raises(ValueError, match="greater than or equal to 100"):
        ServerSettings(gc_threshold=10)
