"""The fkd shard format: one place that knows the bytes on disk.

``ShardSet`` reads and verifies a set; ``ShardSetWriter`` writes one; ``Manifest`` describes it.
"""

from . import codecs
from .format import FORMAT_VERSION, MANIFEST_NAME
from .io import LocationError
from .manifest import Manifest, ManifestError, ShardInfo
from .reader import ShardError, ShardSet
from .records import BatchRecord, ImageRecord, RecordError
from .writer import OutputExistsError, ShardSetWriter

__all__ = [
    "FORMAT_VERSION", "MANIFEST_NAME", "BatchRecord", "ImageRecord", "LocationError", "Manifest",
    "ManifestError", "OutputExistsError", "RecordError", "ShardError", "ShardInfo", "ShardSet",
    "ShardSetWriter", "codecs",
]
