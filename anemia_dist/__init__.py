"""Fine-tune an ImageNet ResNet into a binary anemia screening classifier, on 1..N GPUs or CPU ranks."""

__version__ = "0.1.0"
