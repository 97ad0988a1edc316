"""alexnet-train's Hydra configuration, installed as the package alexnet_dist.conf."""
