"""The vocabulary of the shard format: every file name, record key, member suffix, value name, limit
and the version live here; no other module spells one.

A shard set is a directory (or URL prefix) holding ``manifest.json`` and two kinds of WebDataset tar
shards:

- ``images-NNNNNN.tar``: one record per synthetic image, in sample-index order.
  Members ``{key}.img`` (the original file bytes) and ``{key}.meta.msgpack``.
- ``labels-NNNNNN.tar``: one record per (epoch, batch), in that order; a shard never
  spans two epochs. Members ``{key}.meta.msgpack`` and one ``.npy`` per array.

While a writer runs (and after it was interrupted) ``progress.json`` names the shards it has
finished; it is removed when the manifest is written.
"""

from __future__ import annotations

import re

FORMAT_NAME = "fkd-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = "progress.json"

IMAGES_KIND = "images"
LABELS_KIND = "labels"
SHARD_KINDS = (IMAGES_KIND, LABELS_KIND)
SHARD_NAME = re.compile(r"(images|labels)-(\d{6})\.tar")
TEMP_SUFFIX = ".partial"

# Member suffixes (the part after the first dot of a tar member name).
IMAGE_BYTES = "img"
META = "meta.msgpack"
NPY = ".npy"
INDICES = "indices"
COORDS = "coords"
FLIPS = "flips"
MIX_INDEX = "mix_index"

# Keys of the msgpack meta members.
IMAGE_META_KEYS = ("index", "label", "path")
IMAGE_META_SIZE_KEYS = ("height", "width")  # written since the sizes are recorded; optional on read
BATCH_META_KEYS = ("epoch", "batch", "n", "mix_lam", "mix_bbox")

MIX_NONE = "none"
MIX_MIXUP = "mixup"
MIX_CUTMIX = "cutmix"
MIX_TYPES = (MIX_NONE, MIX_MIXUP, MIX_CUTMIX)
SOFT_LABEL_DTYPES = ("float16", "float32")

# Label codecs (how a record stores its soft labels) and their member names.
CODEC_RAW = "raw"
CODEC_INT8 = "int8"
CODEC_TOPK = "topk"
SOFT_LABELS = "soft_labels"
SOFT_Q, SOFT_LO, SOFT_STEP = "soft_q", "soft_lo", "soft_step"
SOFT_TOPK_VALUES, SOFT_TOPK_INDEX, SOFT_FILL = "soft_topk_values", "soft_topk_index", "soft_fill"

# Fixed tar header fields, so that the same input gives the same bytes. An integer mtime: a float
# one makes tarfile add a PAX header to every member, which doubles the time to list a shard.
TAR_MTIME = 0
TAR_USER = "fkd"
TAR_BLOCK = 512

# Bounds on what a reader accepts before it allocates anything for it.
MAX_MANIFEST_BYTES = 64 * 2**20
MAX_PROGRESS_BYTES = 64 * 2**20
MAX_SOFT_LABEL_WIDTH = 1 << 20  # classes; ImageNet-21k has 21,843
MAX_IMAGE_SIDE = 65535
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold (about 0.25 GB of RGB)
MAX_NPY_HEADER = 4096
# The smallest tar bytes a record can occupy: every member has a header block and a data block.
MIN_IMAGE_RECORD_BYTES = 2 * 2 * TAR_BLOCK
MIN_BATCH_RECORD_BYTES = 5 * 2 * TAR_BLOCK


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


def batches_per_epoch(num_images: int, batch_size: int) -> int:
    """Batches of one epoch: ceil(N / B), the last one short when B does not divide N."""
    return -(-num_images // batch_size)


def batch_rows(num_images: int, batch_size: int, batch: int) -> int:
    """Row count of ``batch`` in every epoch: B, or fewer for the short last one."""
    return min(batch_size, num_images - batch * batch_size)
