"""The fkd shard format: one place that knows the bytes on disk.

``ShardSet`` reads and verifies a set; ``ShardSetWriter`` writes one; ``Manifest`` describes it.
"""

from . import codecs
from .codecs import CodecError
from .format import FORMAT_VERSION, MANIFEST_NAME
from .io import LocationError, LocationMissing
from .manifest import Manifest, ManifestError, ShardInfo
from .reader import ShardError, ShardSet
from .records import BatchRecord, BatchSpec, ImageRecord, RecordError
from .writer import OutputExistsError, ResumeError, ShardSetWriter

__all__ = [
    "FORMAT_VERSION", "MANIFEST_NAME", "BatchRecord", "BatchSpec", "CodecError", "ImageRecord", "LocationError",
    "LocationMissing", "Manifest", "ManifestError", "OutputExistsError", "RecordError", "ResumeError",
    "ShardError", "ShardInfo", "ShardSet", "ShardSetWriter", "codecs",
]
