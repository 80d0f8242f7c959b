"""Churn data and models: event logs to tensors, the generators, the baseline, the GRU and `predict`.

It imports nothing of the training side; of ours, only the foundation
(`pserver.errors`, `pserver.fileio`, which import only the standard library).

The words a reader meets first here (docs/glossary.md has more):

- *step*: one time step of a customer's sequence, a day or a bucket of N
  days (`--bucket-days`).
- *observation window*: the days of events before the cut-off that make a
  customer's sequence; not λ, the training's window.
- *prepared directory*: what `notpu prepare` writes and training reads
  (`X.npy`, `y.npy`, `ids.npy`, `active.npy`, `spec.json`).
- *spec*: `spec.json`, how a log became a tensor; `notpu predict` applies it
  unchanged to new events.
"""
