"""The training side: workers, the evaluator, local mode, the command lines, `fit` (runner.api), and `prepare`
and `predict` on DataFrames or files (runner.frames).

The words a reader meets first here (docs/glossary.md has them all):

- *centre*: the model the parameter server holds, one flat float32 vector split over the shards; the
  evaluator scores it, and `model.keras` is one.
- *window* (λ): the local steps a worker trains between two exchanges.
- *exchange*: what a worker does every window, through its rule (`optimizers`).
- *round*: one step of a synchronous rule: every live worker's value, applied at once.
- *staleness*: the updates other workers made to the centre between the version a worker last saw and
  the one its push lands on; the evaluator reports its mean.
- *incarnation*: how many processes have held a worker's rank; a worker restarted on its rank is the
  next one.
"""

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
