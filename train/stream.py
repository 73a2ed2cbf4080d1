"""Old import path of the batch stream, kept for one release: use :mod:`fkd_shards.batches`."""

from fkd_shards.batches.batch import Batch
from fkd_shards.batches.stream import BatchStream, StreamError, batch_at

__all__ = ["Batch", "BatchStream", "StreamError", "batch_at"]
