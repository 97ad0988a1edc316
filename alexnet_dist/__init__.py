"""alexnet_dist: train AlexNet-family image classifiers from WebDataset shards, at scale."""

__version__ = "0.1.0"
