"""Float32 precision on CUDA, set explicitly and recorded: TF32 and cuDNN's autotuner.

torch's defaults differ by operation: TF32 is on for cuDNN convolutions and off for matrix products,
so ``--amp off`` on an Ampere or Hopper GPU is not float32 unless someone turns it off. Both tools
turn it off unless ``--tf32`` asks for it, and write what they set into their records.
"""

from __future__ import annotations


def set_precision(*, tf32: bool, cudnn_benchmark: bool) -> dict:
    """Set TF32 (matrix products and convolutions together) and cuDNN's autotuner (``benchmark``:
    faster convolutions, chosen per shape by timing, so not the same algorithm run to run); returns
    the record of it. Without CUDA the flags change nothing and are recorded all the same."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark
    return {"tf32": tf32, "cudnn_benchmark": cudnn_benchmark}
