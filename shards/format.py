"""The vocabulary of the shard format: every file name, record key and version lives here.

A shard set is a directory (or URL prefix) holding ``manifest.json`` and two kinds of
WebDataset tar shards:

- ``images-NNNNNN.tar``: one record per synthetic image, in sample-index order.
  Members ``{key}.img`` (the original file bytes) and ``{key}.meta.msgpack``.
- ``labels-NNNNNN.tar``: one record per (epoch, batch), in that order; a shard never
  spans two epochs. Members ``{key}.meta.msgpack`` and one ``.npy`` per array.
"""

FORMAT_NAME = "fkd-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

IMAGES_KIND = "images"
LABELS_KIND = "labels"
SHARD_KINDS = (IMAGES_KIND, LABELS_KIND)
TEMP_SUFFIX = ".partial"

# Member suffixes (the part after the first dot of a tar member name).
IMAGE_BYTES = "img"
META = "meta.msgpack"
INDICES = "indices.npy"
COORDS = "coords.npy"
FLIPS = "flips.npy"
MIX_INDEX = "mix_index.npy"

MIX_TYPES = ("none", "mixup", "cutmix")
SOFT_LABEL_DTYPES = ("float16", "float32")

# Fixed tar header fields, so that the same input gives the same bytes. An integer mtime: a float
# one makes tarfile add a PAX header to every member, which doubles the time to list a shard.
TAR_MTIME = 0
TAR_USER = "fkd"


def shard_name(kind: str, number: int) -> str:
    """File name of shard ``number`` of ``kind`` (``images`` or ``labels``)."""
    if kind not in SHARD_KINDS:
        raise ValueError(f"unknown shard kind {kind!r}; expected one of {SHARD_KINDS}")
    return f"{kind}-{number:06d}.tar"


def image_key(index: int) -> str:
    """Record key of sample ``index`` in an image shard."""
    return f"{index:08d}"


def batch_key(epoch: int, batch: int) -> str:
    """Record key of (epoch, batch) in a label shard."""
    return f"e{epoch:05d}_b{batch:06d}"
