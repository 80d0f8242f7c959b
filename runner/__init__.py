"""The training side: workers, the evaluator, local mode, the command lines, and `fit` (runner.api)."""


def __getattr__(name: str):
    # lazy: `python -m runner.worker_cli` must not import local mode's driver to start
    if name in ("fit", "FitResult"):
        from runner import api

        return getattr(api, name)
    raise AttributeError(f"module 'runner' has no attribute {name!r}")
