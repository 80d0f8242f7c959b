"""The training side: workers, the evaluator, local mode, the command lines, `fit` (runner.api), and `prepare`
and `predict` on DataFrames or files (runner.frames)."""

_LAZY = {"fit": "api", "FitResult": "api", "prepare": "frames", "predict": "frames", "Prepared": "frames",
         "UnseenTypesWarning": "frames"}


def __getattr__(name: str):
    # lazy: `python -m runner.worker_cli` must not import local mode's driver (nor pandas) to start
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"runner.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'runner' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
