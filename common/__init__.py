"""Small helpers every tool needs and that are not about the shard format: one-line, escaped
messages (``text``), bounded reads and atomic writes of local files (``files``), ordered read-ahead
(``prefetch``). Imports nothing else of this project."""
