"""``fkd-train``: the exact KD loop over a shard set's batches (``fkd_shards.batches.BatchStream``),
with its configuration, checkpoints, run directory, metrics and report."""
