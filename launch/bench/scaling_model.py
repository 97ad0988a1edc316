"""The multi-GPU throughput model of docs/scaling.md: step time, communication and the time for 90
epochs of ImageNet, from one GPU's measured speed and stated network figures. Prints a Markdown
table; every input is named below, with where it comes from.

    python launch/bench/scaling_model.py
"""

import math

# Measured on one H100 80GB (docs/performance.md, `alexnet-bench model --precision bf16`): forward,
# backward and SGD step on random tensors already on the GPU, batch 256, 224 px.
IMAGES_PER_SEC = {"alexnet_owt": 33_616, "alexnet2012": 7_876}  # owt: channels-last; 2012: NCHW
# The one loader figure measured on a GPU machine: webdataset + PIL alone, 14 worker processes on
# 16 CPU cores (H200 machine, docs/performance.md). DALI's GPU decoding is not measured yet.
LOADER_IMAGES_PER_SEC = 9_300
PARAMETERS = {"alexnet_owt": 61_100_840, "alexnet2012": 60_965_224}  # README, models table
# Assumed (not measured here): NCCL all-reduce bus bandwidth, 8 GPUs a node.
NVLINK_BUS_GBPS = 360.0  # within a node (NVLink 4: 450 GB/s each way; about 80% of it)
NETWORK_BUS_GBPS = 40.0  # between nodes: one 400 Gb/s NIC per GPU = 50 GB/s, about 80% of it
LATENCY_S = 10e-6  # per hop of a tree all-reduce between nodes
BUCKETS = 10  # DDP's default 25 MB buckets over 244 MB of fp32 gradients
GPUS_PER_NODE = 8
IMAGES_90_EPOCHS = 90 * 1_281_167
BACKWARD_SHARE = 2 / 3  # of a step's compute; DDP overlaps the all-reduce with it


def allreduce_s(gpus: int, nbytes: float) -> float:
    """Ring all-reduce: every GPU sends and receives 2 (n - 1) / n of the gradients, at the slowest
    link's bus bandwidth; a tree's latency per bucket across nodes."""
    if gpus == 1:
        return 0.0
    bandwidth = NVLINK_BUS_GBPS if gpus <= GPUS_PER_NODE else NETWORK_BUS_GBPS
    nodes = math.ceil(gpus / GPUS_PER_NODE)
    latency = BUCKETS * 2 * math.log2(nodes) * LATENCY_S if nodes > 1 else 0.0
    return 2 * (gpus - 1) / gpus * nbytes / (bandwidth * 1e9) + latency


def row(model: str, gpus: int, per_gpu_batch: int, grad_bytes_per_param: int) -> dict:
    compute = per_gpu_batch / IMAGES_PER_SEC[model]
    comm = allreduce_s(gpus, PARAMETERS[model] * grad_bytes_per_param)
    serial = compute + comm
    overlapped = (1 - BACKWARD_SHARE) * compute + max(BACKWARD_SHARE * compute, comm)
    rate = gpus * per_gpu_batch / overlapped
    return {
        "model": model,
        "gpus": gpus,
        "global batch": gpus * per_gpu_batch,
        "gradients": "bf16" if grad_bytes_per_param == 2 else "fp32",
        "compute ms": compute * 1e3,
        "all-reduce ms": comm * 1e3,
        "step ms, no overlap": serial * 1e3,
        "step ms, overlapped": overlapped * 1e3,
        "img/s": rate,
        "90 epochs, min": IMAGES_90_EPOCHS / rate / 60,
        "img/s, PIL loader": gpus * min(rate / gpus, LOADER_IMAGES_PER_SEC),
        "90 epochs, PIL loader, min": IMAGES_90_EPOCHS / (gpus * min(rate / gpus, LOADER_IMAGES_PER_SEC)) / 60,
    }


def main():
    rows = []
    for model in ("alexnet_owt", "alexnet2012"):
        for gpus, batch in ((8, 256), (64, 256), (512, 128)):
            for grad_bytes in (4, 2):
                rows.append(row(model, gpus, batch, grad_bytes))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        cells = [
            f"{v:,.0f}" if k.startswith(("img/s", "global batch")) else f"{v:.2f}" if isinstance(v, float) else str(v)
            for k, v in r.items()
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
