"""Data for examples and benchmarks: synthetic CIFAR-100-shaped batches.

Synthetic data is said plainly wherever it is used: it is a stand-in with the shape of CIFAR-100 (3x32x32
images, 100 classes) and a learnable structure (each class has its own mean image), not real data.
"""

import torch

__all__ = ["SyntheticCifar100"]


class SyntheticCifar100:
    """Deterministic stream of (images, labels) batches with a class-dependent mean image plus noise."""

    num_classes = 100
    image_shape = (3, 32, 32)

    def __init__(self, batch_size: int, seed: int = 0, rank: int = 0, noise: float = 1.0):
        gen = torch.Generator().manual_seed(seed)
        # Smooth class templates, so convolutions have spatial structure to learn.
        coarse = torch.randn(self.num_classes, 3, 8, 8, generator=gen)
        self.templates = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear", align_corners=False)
        self.batch_size = batch_size
        self.noise = noise
        self.gen = torch.Generator().manual_seed(seed * 1000 + rank + 1)

    def batch(self):
        labels = torch.randint(0, self.num_classes, (self.batch_size,), generator=self.gen)
        images = self.templates[labels] + self.noise * torch.randn(
            (self.batch_size,) + self.image_shape, generator=self.gen)
        return images, labels
