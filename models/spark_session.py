"""A SparkSession for `--engine spark`, after checking that pyspark and Java are there.

pyspark is an optional extra (`notpu[spark]`) and needs a Java 17+ runtime;
without either, `spark_session` raises one DataError naming what to install,
before any JVM is started.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from typing import Any

from models.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_MASTER = "local[*]"
#: The driver only plans jobs and gathers small tables (pass 1's type x day counts, one row per part),
#: so it needs no more than this whatever the log's size; in local[N] the executors share its JVM.
DRIVER_MEMORY = "1g"
JAVA_MIN_VERSION = 17
JAVA_VERSION_TIMEOUT_S = 30.0
JVM_EXIT_TIMEOUT_S = 30.0


def _java() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home and os.access(os.path.join(home, "bin", "java"), os.X_OK):
        return os.path.join(home, "bin", "java")
    return shutil.which("java")


def check_spark_available() -> None:
    """DataError unless pyspark imports and a Java 17+ runtime is on JAVA_HOME or PATH."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise DataError("--engine spark needs pyspark 4: pip install 'notpu[spark]'") from None
    java = _java()
    if java is None:
        raise DataError(f"--engine spark needs Java {JAVA_MIN_VERSION}+ (none on JAVA_HOME or PATH): "
                        f"install a JDK such as openjdk-{JAVA_MIN_VERSION}-jre-headless, or set JAVA_HOME")
    try:
        r = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=JAVA_VERSION_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataError(f"--engine spark: {java} -version failed ({exc}); install a working Java "
                        f"{JAVA_MIN_VERSION}+ or set JAVA_HOME") from None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', r.stderr + r.stdout)
    major = int(m.group(1)) if m else 0
    major = int(m.group(2)) if m and major == 1 and m.group(2) else major  # "1.8.0" is Java 8
    if major < JAVA_MIN_VERSION:
        raise DataError(f"--engine spark needs Java {JAVA_MIN_VERSION}+, {java} is Java {major or '?'}: "
                        f"install openjdk-{JAVA_MIN_VERSION}-jre-headless or point JAVA_HOME at it")


def spark_session(master: str | None = None, app: str = "notpu-prepare") -> Any:
    """A SparkSession on `master` (default local[*]) with UTC time and no web UI; the caller stops it."""
    check_spark_available()
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master(master or DEFAULT_MASTER).appName(app)
             .config("spark.driver.memory", DRIVER_MEMORY)
             .config("spark.sql.session.timeZone", "UTC")  # a timestamp without an offset is UTC, as in the local path
             .config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")  # a glob logs a Java stack trace at WARN; errors reach the user as DataError
    log.info("spark %s on %s, default parallelism %d", spark.version, spark.sparkContext.master,
             spark.sparkContext.defaultParallelism)
    return spark


def stop_spark(spark: Any, timeout_s: float = JVM_EXIT_TIMEOUT_S) -> None:
    """Stop the session and the JVM pyspark launched for it, waiting at most timeout_s for it to exit.

    `SparkSession.stop` leaves the gateway JVM running for a next session; a
    command or a test that is done with Spark should leave no process behind.
    The JVM exits when its stdin closes (that is how pyspark ties it to the driver).
    """
    from pyspark import SparkContext

    spark.stop()
    gateway = SparkContext._gateway
    proc = getattr(gateway, "proc", None)  # None when pyspark did not launch the JVM (a given gateway)
    if gateway is None or proc is None:
        return
    gateway.shutdown()
    SparkContext._gateway = SparkContext._jvm = None  # the next spark_session launches a fresh JVM
    if proc.stdin:
        proc.stdin.close()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("the Spark JVM (pid %d) did not exit %.0f s after its stdin closed; killing it", proc.pid, timeout_s)
        proc.kill()
        proc.wait(timeout_s)
