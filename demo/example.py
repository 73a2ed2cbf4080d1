"""An example relabel output to try the tools on, and the tests' fixture: an independent writer of
SRe2L-layout data, following the semantics in docs/semantics.md (not the converter's code).

    python -m fkd_shards.demo.example OUT [--classes 10] [--per-class 10] [--epochs 4] [--input-size 32]


``make_image_folder`` writes an ImageFolder of small images of several sizes and modes;
``make_relabel`` writes ``epoch_{e}/batch_{b}.tar`` files as the original relabel step does and
returns the ground truth (which images each batch holds) so that tests can compare against it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# (width, height, PIL mode, extension) cycled over the images of each class.
IMAGE_KINDS = [(23, 19, "RGB", "jpg"), (16, 16, "RGB", "JPEG"), (31, 17, "L", "png"),
               (20, 27, "P", "png"), (18, 22, "RGBA", "png")]


def make_image_folder(root: str, num_classes: int, per_class: int, seed: int = 0,
                      kinds: list[tuple[int, int, str, str]] = IMAGE_KINDS) -> list[tuple[str, int]]:
    """Write SRe2L-style names ``new{c:03d}/class{c:03d}_id{i:03d}.ext``; returns (path, class) in
    the ImageFolder order written out by hand: class folders sorted, file names sorted."""
    rng = np.random.default_rng(seed)
    samples = []
    for c in range(num_classes):
        folder = os.path.join(root, f"new{c:03d}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            w, h, mode, ext = kinds[(c + i) % len(kinds)]
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            pixels[..., c % 3] = np.clip(pixels[..., c % 3].astype(int) + 60, 0, 255)
            img = Image.fromarray(pixels, "RGB")
            if mode == "L":
                img = img.convert("L")
            elif mode == "P":
                img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
            elif mode == "RGBA":
                img = img.convert("RGBA")
                img.putalpha(Image.fromarray(rng.integers(0, 256, size=(h, w), dtype=np.uint8)))
            path = os.path.join(folder, f"class{c:03d}_id{i:03d}.{ext}")
            img.save(path)
            samples.append((path, c))
    return samples


def replay_orders(num_images: int, seed: int, epochs: int) -> list[list[int]]:
    """SRE2L-FACTS section 3, written out: one generator; per epoch randperm(N) gives the order,
    then a second randperm(N) that only advances the generator."""
    g = torch.Generator()
    g.manual_seed(seed)
    orders = []
    for _ in range(epochs):
        orders.append(torch.randperm(num_images, generator=g).tolist())
        torch.randperm(num_images, generator=g)
    return orders


def _rand_bbox(size: int, lam: float, rng: np.random.Generator) -> list[np.int64]:
    cut = int(size * math.sqrt(1.0 - lam))
    cx, cy = rng.integers(size), rng.integers(size)
    return [np.int64(np.clip(cx - cut // 2, 0, size)), np.int64(np.clip(cy - cut // 2, 0, size)),
            np.int64(np.clip(cx + cut // 2, 0, size)), np.int64(np.clip(cy + cut // 2, 0, size))]


@dataclass
class RelabelTruth:
    batch_size: int
    epochs: int
    orders: list[list[int]]  # per epoch, the sample order
    files: dict[tuple[int, int], str]

    def indices(self, epoch: int, batch: int) -> list[int]:
        return self.orders[epoch][batch * self.batch_size:(batch + 1) * self.batch_size]


def make_relabel(fkd_path: str, samples: list[tuple[str, int]], *, epochs: int, batch_size: int,
                 width: int, input_size: int, mix_type: str = "cutmix", dtype=torch.float16,
                 seed: int = 42, data_seed: int = 1) -> RelabelTruth:
    """Write a relabel directory in the original layout; logits favour each row's class."""
    rng = np.random.default_rng(data_seed)
    torch.manual_seed(data_seed)
    num_images = len(samples)
    orders = replay_orders(num_images, seed, epochs)
    files = {}
    for epoch in range(epochs):
        os.makedirs(os.path.join(fkd_path, f"epoch_{epoch}"), exist_ok=True)
        for b in range(math.ceil(num_images / batch_size)):
            rows = orders[epoch][b * batch_size:(b + 1) * batch_size]
            n = len(rows)
            coords = []
            for k in rows:
                with Image.open(samples[k][0]) as img:
                    w, h = img.size
                scale = rng.uniform(0.08, 1.0)
                ch, cw = max(1, int(h * math.sqrt(scale))), max(1, int(w * math.sqrt(scale)))
                i, j = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
                coords.append((i / h, j / w, ch / h, cw / w))
            coords = torch.FloatTensor(coords)
            flips = torch.from_numpy(rng.random(n) < 0.5)
            classes = torch.tensor([samples[k][1] for k in rows])
            logits = torch.randn(n, width) + 6.0 * torch.nn.functional.one_hot(classes, width)
            mix_index = lam = bbox = None
            if mix_type in ("cutmix", "mixup"):
                mix_index = torch.randperm(n)
                lam = float(rng.beta(1.0, 1.0))
            if mix_type == "cutmix":
                bbox = _rand_bbox(input_size, lam, rng)
            path = os.path.join(fkd_path, f"epoch_{epoch}", f"batch_{b}.tar")
            torch.save([coords, flips, mix_index, lam, bbox, logits.to(dtype)], path)
            files[(epoch, b)] = path
    return RelabelTruth(batch_size, epochs, orders, files)


def main(argv: list[str] | None = None) -> int:
    """``python -m fkd_shards.demo.example OUT``: a small example relabel output for trying the tools."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fkd_shards.demo.example",
                                description="Write OUT/train (an ImageFolder of small random images) and OUT/fkd "
                                            "(a relabel output in the original SRe2L layout, with random logits "
                                            "that favour each image's class), to try fkd-convert and fkd-train.")
    p.add_argument("out", help="a new or empty directory")
    p.add_argument("--classes", type=int, default=10, help="class folders (default: 10)")
    p.add_argument("--per-class", type=int, default=10, help="images per class (default: 10)")
    p.add_argument("--epochs", type=int, default=4, help="relabel epochs (default: 4)")
    p.add_argument("--batch-size", type=int, default=32, help="relabel batch size (default: 32)")
    p.add_argument("--input-size", type=int, default=32, help="crop size in px (default: 32)")
    p.add_argument("--mix-type", default="cutmix", choices=["cutmix", "mixup", "none"],
                   help="batch mix (default: cutmix)")
    a = p.parse_args(argv)
    for flag, value, low, high in (("--classes", a.classes, 2, 1000), ("--per-class", a.per_class, 1, 1000),
                                   ("--epochs", a.epochs, 1, 1000), ("--batch-size", a.batch_size, 1, 10**5),
                                   ("--input-size", a.input_size, 8, 512)):
        if not low <= value <= high:
            p.error(f"{flag} must be in [{low}, {high}], got {value}")
    if os.path.lexists(a.out) and not (os.path.isdir(a.out) and not os.listdir(a.out)):
        p.error(f"{a.out}: exists and is not an empty directory; choose a new one")
    kinds = [(48, 40, "RGB", "jpg"), (40, 40, "RGB", "jpg"), (56, 44, "RGB", "png")]
    samples = make_image_folder(os.path.join(a.out, "train"), a.classes, a.per_class, kinds=kinds)
    make_relabel(os.path.join(a.out, "fkd"), samples, epochs=a.epochs, batch_size=a.batch_size,
                 width=a.classes, input_size=a.input_size, mix_type=a.mix_type)
    print(f"wrote {len(samples)} images to {a.out}/train and {a.epochs} epochs of relabel output to {a.out}/fkd "
          f"(random logits that favour each image's class; crops of {a.input_size} px: --input-size "
          f"{a.input_size})")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
