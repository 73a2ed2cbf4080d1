"""Every image decoded once per run into one shared-memory uint8 buffer, for the crop workers.

Decoding is deterministic, so cropping from the cached pixels is bit-identical to decoding again.
The buffer is a torch tensor in shared memory: DataLoader workers see it without a copy, whatever
their start method. Size: H*W*3 bytes per image (150 KB at 224x224).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .crop import decode_rgb


class DecodedImages:
    """RGB uint8 pixels of images ``0..N-1``; ``pixels(k)`` is an (H, W, 3) view."""

    def __init__(self, encoded: list[bytes], threads: int = 1):
        with ThreadPoolExecutor(max(1, threads)) as pool:  # PIL decodes without the GIL
            arrays = list(pool.map(lambda data: np.asarray(decode_rgb(data)), encoded))
        sizes = np.array([a.size for a in arrays], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.shapes = np.array([a.shape[:2] for a in arrays], dtype=np.int64)
        self.buffer = torch.empty(int(self.offsets[-1]), dtype=torch.uint8).share_memory_()
        flat = self.buffer.numpy()
        for k, a in enumerate(arrays):
            flat[self.offsets[k]:self.offsets[k + 1]] = a.reshape(-1)

    def __len__(self) -> int:
        return len(self.shapes)

    def pixels(self, k: int) -> np.ndarray:
        h, w = self.shapes[k]
        return self.buffer.numpy()[self.offsets[k]:self.offsets[k + 1]].reshape(h, w, 3)
