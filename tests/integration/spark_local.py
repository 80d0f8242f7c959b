"""What the Spark test modules share: a `local[2]` session per module, and finding processes by command line."""
from __future__ import annotations

from typing import Iterator

import psutil
import pytest

from models.spark_session import spark_session, stop_spark


@pytest.fixture(scope="module")
def spark() -> Iterator[object]:
    """A `local[2]` session for the module; once it stops, its JVM must be gone."""
    session = spark_session("local[2]", app="notpu-test")
    session.conf.set("spark.sql.shuffle.partitions", "4")  # tiny logs: 200 shuffle tasks would be all overhead
    jvm = psutil.Process(session.sparkContext._jvm.ProcessHandle.current().pid())
    try:
        yield session
    finally:
        stop_spark(session)
        assert not jvm.is_running() or jvm.status() == psutil.STATUS_ZOMBIE, "the Spark JVM outlived stop_spark"


def spark_processes(session: object) -> set[int]:
    """The session's JVM and its Python workers, which live until the module ends."""
    jvm = session.sparkContext._jvm.ProcessHandle.current().pid()
    return {jvm} | {p.pid for p in psutil.Process(jvm).children(recursive=True)}


def processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(text in a for a in p.info["cmdline"] or ()):
                found.append(p)
        except psutil.Error:
            pass
    return found
