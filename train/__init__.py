"""``fkd-train``: the ordered batch stream (``train.stream.BatchStream``) and the exact KD loop."""
