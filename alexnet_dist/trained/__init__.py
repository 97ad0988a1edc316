"""What leaves a run: a trained network with what its inputs were (read from a checkpoint alone,
inputs.py), and its export as files other programs load without alexnet_dist (export.py)."""
