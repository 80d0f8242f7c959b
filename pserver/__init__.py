"""The parameter server: the wire, the shards that hold the centre, the coordinator, and the client workers use.

It knows nothing of Keras or of the update rules and imports nothing else of
ours: a rule's shard-side apply arrives as a plug-in its config names
(`ShardConfig.plugins`). Its foundation, `pserver.errors` (`NotpuError`, the
one error root) and `pserver.fileio` (the one atomic write), imports only the
standard library, so every package may use it.

The words a reader meets first here (docs/glossary.md has them all):

- *centre*: the model the server holds, one flat float32 vector of every
  weight, split into contiguous ranges, one per shard.
- *window* (λ): the local steps a worker trains between two exchanges.
- *exchange*: what a worker does every window: it sends what its rule
  computes to every shard and continues from what the rule makes of the reply.
- *round*: one step of a synchronous rule: every live worker's value, applied
  to the centre at once.
- *staleness*: how many updates other workers made to the centre between the
  version a worker last saw and the one its push lands on.
- *incarnation*: how many processes have held a worker's rank; a restarted
  worker numbers its pushes past every earlier incarnation's.
"""
