"""Everything that turns a verified batch record into the tensor a model sees, for every tool.

A batch's way: :class:`~fkd_shards.shards.BatchRecord` (``shards/records.py``, read by
``ShardSet.batches``) -> :class:`.plan.BatchPlan` (``plan.py``: one rank's rows, the images to crop)
-> crops (``crop.py`` with PIL on the CPU, or ``device_crop.py`` on the device, from the pixels of
``images.py``) -> :class:`.batch.Batch` (``batch.py``) -> :meth:`.batch.Batch.model_input`
(normalise and mix, ``mix.py``). ``stream.py`` runs it in order through worker processes;
``draws.py`` holds the relabel step's draws (crops, flips, mix) from which records are made.
"""

from .batch import Batch
from .plan import BatchPlan
from .stream import BatchStream, StreamError

__all__ = ["Batch", "BatchPlan", "BatchStream", "StreamError"]
