"""Options shared by tests/ and bench/."""
from __future__ import annotations

import os


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False,
                     help="run the small version of each benchmark (what CI runs)")


def pytest_configure(config):
    if config.getoption("--quick"):
        os.environ["NOTPU_BENCH_QUICK"] = "1"
