"""Measuring tools, apart from the package's training path: `alexnet-bench` (cli.py: loader, model,
train, ddp and baseline modes), the start-up cost of many ranks (scale.py) and a plain PyTorch
loop to compare the framework with (baseline.py). Nothing in cli/, training/ or data/ imports them."""
