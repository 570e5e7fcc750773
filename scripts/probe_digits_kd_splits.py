"""Probe: digits KD over repeated stratified 70/30 splits (not a bench case).

On the zoo split the KD gap is a handful of the 540 evaluation images, so the bench's "gap
recovered" swings by several points per image. This script re-draws the split with sklearn's
``random_state=SPLIT`` (0 is the zoo split), trains a teacher per split (the set-up's ``teacher``
block as the bench does, else the zoo recipe), then three student seeds per kind with the bench's
``KD_SETUP["digits"]`` (overrides as JSON; students narrowed from the zoo CNN, as in the bench),
and prints one JSON line per split. Summarise the lines with ``--summary FILE``.

Usage:
    python scripts/probe_digits_kd_splits.py 3 labels,labels_alt,kd '{"epochs": 120}' >> out.jsonl
    python scripts/probe_digits_kd_splits.py --summary out.jsonl
"""

from __future__ import annotations

import json
import statistics
import sys


def run_split(split: int, kinds: list[str], overrides: dict) -> dict:
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from netpress.bench import distill as bd
    from netpress.core.data import Batch
    from netpress.distill import augmented_ce, derive_student, distill
    from netpress.train import TrainConfig, fine_tune
    from netpress.zoo.sources import DIGITS_TEST_FRACTION
    from netpress.zoo.trained import TRAINED, _fit, digits_cnn

    torch.set_num_threads(1)
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = (torch.from_numpy(a) for a in train_test_split(
        x, y, test_size=DIGITS_TEST_FRACTION, stratify=y, random_state=split))
    train = [Batch((xtr[i:i + 32],), ytr[i:i + 32]) for i in range(0, len(xtr), 32)]
    test = [Batch((xte,), yte)]
    s = {**bd.KD_SETUP["digits"], **overrides}
    if "teacher" in s:  # bench-trained teacher (KD_SETUP "teacher" block), one member
        t = s["teacher"]
        torch.manual_seed(0)
        teacher = bd._member("digits", t["width"])
        fine_tune(teacher, train, TrainConfig(epochs=t["epochs"], lr=t["lr"], seed=0),
                  augmented_ce(t["augment"], 0))
    else:  # the zoo recipe
        spec = TRAINED["digits_cnn"][2]
        torch.manual_seed(spec.seed)
        teacher = digits_cnn(spec.width)
        _fit(teacher, xtr, ytr, spec)
    teacher.eval()
    student_of = digits_cnn(TRAINED["digits_cnn"][2].width)  # as the bench: the zoo CNN narrowed
    out: dict = {"split": split, "cfg": overrides, "teacher": bd._acc(teacher, test), "acc": {}}
    for kind in kinds:
        accs = []
        for seed in (0, 1, 2):
            st = derive_student(student_of, width=s["width"], seed=seed)
            if kind.startswith("labels"):
                fine_tune(st, train, TrainConfig(epochs=bd._epochs(s, kind), lr=s["lr"], seed=seed),
                          augmented_ce(bd._augment(s, kind), seed))
            else:  # kd or feature_kd (the bench's hint layers)
                cfg = {"method": kind, "epochs": s["epochs"], "lr": s["lr"], "seed": seed,
                       "temperature": s["T"], "alpha": s["alpha"], "augment": s["augment"]}
                if kind == "feature_kd":
                    cfg.update(features=bd.FEATURES["digits"], beta=1.0)
                distill(st, teacher, train, cfg)
            accs.append(bd._acc(st, test))
        out["acc"][kind] = accs
    return out


def summary(path: str) -> None:
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    pooled: dict[str, list[float]] = {}
    for r in rows:
        m = {k: statistics.mean(v) for k, v in r["acc"].items()}
        for k, v in [*m.items(), ("teacher", r["teacher"])]:
            pooled.setdefault(k, []).append(v)
    mean = {k: statistics.mean(v) for k, v in pooled.items()}
    base = max(mean.get("labels", 0.0), mean.get("labels_alt", 0.0))
    print(f"{len(rows)} splits", {k: round(v, 4) for k, v in mean.items()})
    for kind in ("kd", "feature_kd"):
        if kind in mean and mean["teacher"] > base:
            print(f"{kind}: gap recovered {(mean[kind] - base) / (mean['teacher'] - base):.0%}")


if __name__ == "__main__":
    if sys.argv[1] == "--summary":
        summary(sys.argv[2])
    else:
        cfg = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
        print(json.dumps(run_split(int(sys.argv[1]), sys.argv[2].split(","), cfg)), flush=True)
