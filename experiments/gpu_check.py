"""One call on a GPU machine (`bash experiments/gpu_check.sh`, under 5 minutes on one H100-class GPU): ISIF on
CIFAR-10-shaped data (images/s: the bare step, bf16 vs fp32, channels_last on / off; the resident data path vs
DataLoader + PIL), Recall@K at SOP size against the GEMM floor, faiss GPU k-means on 60,000 x 512 with K =
10,000, and a training step and the device augmentation under torch.cuda's sync debug mode. It exits non-zero
when any path ran on the CPU (`cpu_fallbacks`): the check is that nothing silently fell back."""
from __future__ import annotations

import sys
import time
import warnings

import torch

CIFAR_STEP = {"backbone": "cifar_resnet18", "image": 32, "batch": 128, "rounds": 10, "budget": 400}


def cpu_fallbacks(where: dict[str, object]) -> list[str]:
    """The paths of `where` ({path: the device it ran on, or a faiss description}) that did not run on a GPU:
    a torch device other than cuda, or a faiss that is not the GPU build."""
    bad = []
    for path, device in where.items():
        if isinstance(device, torch.device):
            if device.type != "cuda":
                bad.append(f"{path} ran on {device}")
        elif "GPU build" not in str(device) or "WARNING" in str(device):
            bad.append(f"{path}: {device}")
    return bad


def host_syncs_in(fn) -> int:
    """How many synchronising CUDA calls `fn` makes (torch.cuda.set_sync_debug_mode("warn") warns on each)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main() -> int:
    from embedding_core import faiss_build, search
    from experiments import bench

    if not torch.cuda.is_available():
        print("torch sees no CUDA device: run this on a GPU machine")
        return 2
    device = torch.device("cuda")
    where: dict[str, object] = {}
    print(bench.machine(), "\n", bench.device_info(), "\n", flush=True)

    size = bench.StepSize(**CIFAR_STEP)
    rates = bench.step_rates(size, ("bare fp32", "channels_last", "bf16 autocast"), device)
    bare = rates["bare fp32"]["step"]
    for variant, r in rates.items():
        print(f"ISIF step {variant:>14}: {2 * size.batch / r['step']:8,.0f} images/s ({bare / r['step']:.2f}x bare)")
        where[f"step {variant}"] = bench.step_device[variant]

    data = bench.DataSize(8_192, 128, 20, 3, "cifar_resnet18")
    for name, resident, workers in (("DataLoader + PIL", False, 8), ("device-resident", True, 0)):
        dm = bench.synthetic_cifar(data, resident, workers)
        rate = bench._images_per_second(dm, data, device, train=True)
        print(f"ISIF training, {name:>16}: {2 * rate:8,.0f} images/s")
        if resident:
            where["resident images"] = dm._resident.device
            views = dm.on_after_batch_transfer({k: v.to(device) if torch.is_tensor(v) else v for k, v in
                                                next(iter(dm.train_dataloader())).items()}, 0)["views"]
            where["device augmentation"] = views[0].device
            syncs = host_syncs_in(lambda dm=dm: dm.device_train(dm._resident[:128], torch.rand(
                128, dm.device_train.draws, device=device)))
            print(f"device augmentation of 128 images: {syncs} synchronising CUDA calls")
            where["augmentation without host syncs"] = device if syncs == 0 else torch.device("cpu")

    print(bench._floor_row(60_502, 128, 2), "(N x D | ours | GEMM floor | ours/floor | faiss | faiss/floor)")

    faiss = search.load_faiss()
    where["faiss"] = faiss_build.describe(faiss)
    print(where["faiss"])
    if faiss is not None and faiss_build.is_gpu_build(faiss):
        x = bench.clustered_features(60_000, 512, 10_000).to(device)
        start = time.perf_counter()
        labels = search.kmeans(x, 10_000, restarts=1, iterations=20, backend="faiss-gpu")
        torch.cuda.synchronize()
        print(f"faiss GPU k-means 60,000 x 512, K = 10,000, 20 iterations: {time.perf_counter() - start:.1f} s")
        where["k-means labels"] = labels.device

    bad = cpu_fallbacks(where)
    print("\n" + ("every path ran on the GPU" if not bad else "RAN ON THE CPU:\n  " + "\n  ".join(bad)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
