"""Throughput of the shared fine-tuning loop, CPU against GPU, on the MNIST-1D CNN (docs/gpu.md).

Trains the zoo's ``mnist1d_cnn`` architecture from the same seed on every device with
:func:`~netpress.train.loop.fine_tune` (Adam, cosine decay) on the zoo's MNIST-1D training split,
re-batched to each batch size, and reports epochs per second (median over interleaved rounds, so
the devices see the same machine load) and the accuracy on the held-out evaluation split.

Run (prints one JSON row per batch size and device, then the ratios)::

    NETPRESS_PROGRESS=0 PYTHONPATH=src python -m netpress.train.speed --epochs 5 --rounds 3

Example:
    >>> import torch
    >>> from netpress.core.data import as_batches
    >>> from netpress.train.speed import rebatch
    >>> b = as_batches((torch.zeros(10, 1, 40), torch.zeros(10, dtype=torch.long)), batch_size=3)
    >>> [x.size for x in rebatch(b, 4)]
    [4, 4, 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch

from netpress.core.data import Batch, as_batches
from netpress.train.loop import TrainConfig, fine_tune


def rebatch(batches: list[Batch], size: int) -> list[Batch]:
    """The same labelled examples, in the same order, in batches of ``size``."""
    x = torch.cat([b.inputs[0] for b in batches])  # type: ignore[index]
    y = torch.cat([b.target for b in batches if b.target is not None])
    return as_batches((x, y), batch_size=size)


def accuracy(model: torch.nn.Module, batches: list[Batch]) -> float:
    """Top-1 accuracy of ``model`` (on the CPU) over labelled ``batches``."""
    right = total = 0
    with torch.no_grad():
        for b in batches:
            assert b.target is not None
            right += int((b.run(model).argmax(1) == b.target).sum())
            total += b.size
    return right / max(total, 1)


def measure(device: str, train: list[Batch], evaluation: list[Batch], epochs: int,
            lr: float, seed: int = 0) -> dict[str, Any]:
    """Train a fresh MNIST-1D CNN on ``device``; seconds, epochs/s and held-out accuracy."""
    from netpress.zoo.trained import mnist1d_cnn

    torch.manual_seed(seed)
    model = mnist1d_cnn(32)
    t0 = time.perf_counter()
    result = fine_tune(model, train, TrainConfig(epochs=epochs, lr=lr, seed=seed, device=device))
    seconds = time.perf_counter() - t0  # the model is back on the CPU: the GPU work is done
    return {"device": device, "epochs": epochs, "steps": result.steps, "seconds": round(seconds, 3),
            "epochs_per_s": round(epochs / seconds, 3), "final_loss": round(result.losses[-1], 5),
            "held_out_accuracy": round(accuracy(model.eval(), evaluation), 4)}


def qat_digits(device: str, epochs: int = 3, bits: int = 4) -> dict[str, Any]:
    """QAT (``quantize: {method: qat}``) of the zoo ``digits_cnn`` with its fine-tuning on ``device``.

    Calibrates on the calibration split, fine-tunes on the train split, converts to packed integer
    layers and reports the held-out accuracy of the result (on the CPU) and the stage's seconds.
    """
    from netpress.api import quantize
    from netpress.zoo.data import load_data
    from netpress.zoo.models import load_model

    bundle = load_data("digits")
    model = load_model("digits_cnn")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    q = quantize(model, {"method": "qat", "weights": {"bits": bits},
                         "finetune": {"epochs": epochs, "lr": 1e-3, "device": device}},
                 data=bundle.calibration, advanced={"train": bundle.train})
    seconds = time.perf_counter() - t0
    return {"case": f"qat_w{bits}a8_digits_cnn", "device": device, "epochs": epochs,
            "seconds": round(seconds, 3), "fp32_held_out_accuracy": round(accuracy(model.eval(),
                                                                                   bundle.evaluation), 4),
            "held_out_accuracy": round(accuracy(q, bundle.evaluation), 4),
            "on_cpu": all(t.device.type == "cpu" for t in q.state_dict().values())}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Command line entry (see the module doc); returns the rows it printed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    ap.add_argument("--qat", action="store_true", help="also QAT the digits CNN on every device")
    ap.add_argument("--out", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    from netpress.zoo.data import load_data

    bundle = load_data("mnist1d")
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "load_1min": round(os.getloadavg()[0], 2), "train_examples": sum(b.size for b in bundle.train),
           "held_out_examples": sum(b.size for b in bundle.evaluation)}
    print(json.dumps(env), flush=True)
    rows: list[dict[str, Any]] = []
    for size in args.batch_sizes:
        train = rebatch(bundle.train, size)
        for dev in args.devices:  # warm-up (CUDA context, cuDNN autotune), not timed
            measure(dev, train[:4], bundle.evaluation[:1], 1, args.lr)
        runs: dict[str, list[dict[str, Any]]] = {d: [] for d in args.devices}
        for _ in range(args.rounds):
            for dev in args.devices:
                runs[dev].append(measure(dev, train, bundle.evaluation, args.epochs, args.lr))
        for got in runs.values():
            row = {**got[0], "batch_size": size, "rounds": len(got),
                   "epochs_per_s": statistics.median(r["epochs_per_s"] for r in got),
                   "epochs_per_s_all": [r["epochs_per_s"] for r in got]}
            rows.append(row)
            print(json.dumps(row), flush=True)
        if "cpu" in runs and len(runs) > 1:
            base = statistics.median(r["epochs_per_s"] for r in runs["cpu"])
            for dev in runs:
                if dev != "cpu":
                    fast = statistics.median(r["epochs_per_s"] for r in runs[dev])
                    print(json.dumps({"batch_size": size, f"{dev}_over_cpu": round(fast / base, 2)}),
                          flush=True)
    if args.qat:
        for dev in args.devices:
            rows.append(qat_digits(dev))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"env": env, "rows": rows}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
