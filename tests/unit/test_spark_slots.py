"""A cluster's task slots are counted once its executors have registered, within Spark's own wait."""
from __future__ import annotations

import itertools

import pytest

from runner.spark import _seconds, registered_slots


@pytest.mark.parametrize("text,seconds", [("30s", 30.0), ("500ms", 0.5), ("2min", 120.0), ("1500", 1.5)])
def test_spark_durations(text, seconds):
    assert _seconds(text) == seconds


class _Context:
    """A SparkContext whose executors register one more at each look, up to `final`."""

    def __init__(self, master: str, final: int) -> None:
        self.master, self.defaultParallelism = master, 0
        self._counts = itertools.chain(range(1, final), itertools.repeat(final))
        self._jsc = self

    def sc(self):
        return self

    def maxNumConcurrentTasks(self, profile) -> int:
        return next(self._counts)

    def resourceProfileManager(self):
        return self

    def defaultResourceProfile(self):
        return None

    def getConf(self):
        return {"spark.scheduler.maxRegisteredResourcesWaitingTime": "10s"}


def test_the_count_waits_for_executors_still_registering():
    assert registered_slots(_Context("spark://h:7077", final=2), want=2) == 2


def test_a_local_master_is_counted_at_once():
    assert registered_slots(_Context("local[2]", final=3), want=3) == 1
