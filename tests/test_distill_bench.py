"""bench/distill.py: the KD rows measure the gap against the stronger label-only baseline."""

from __future__ import annotations

import pytest

from netpress.bench.distill import KD_KINDS, KD_SETUP, _augment, kd_rows


def _seed(acc: dict[str, float]) -> dict:
    return {"acc": acc, "secs": dict.fromkeys(KD_KINDS, 1.0), "epochs": 40, "params": 3138}


def test_kd_rows_gap_against_the_stronger_baseline():
    rows = kd_rows("mnist1d", [_seed({"labels": 0.95, "labels_alt": 0.93, "kd": 0.97,
                                      "feature_kd": 0.96})] * 3)
    teacher = rows[0]["metric"]
    assert rows[0]["method"].startswith("teacher") and 0.9 < teacher < 1.0
    kd = next(r for r in rows if r["method"].startswith("kd "))
    want = (0.97 - 0.95) / (teacher - 0.95)
    assert f"gap recovered {want:.0%}" in kd["notes"]
    assert "stronger label-only baseline" in next(r for r in rows if r["method"] ==
                                                  "labels_only (student, CE)")["notes"]
    # swap the baselines: the gap follows the stronger one
    rows = kd_rows("mnist1d", [_seed({"labels": 0.93, "labels_alt": 0.95, "kd": 0.97,
                                      "feature_kd": 0.96})] * 3)
    kd = next(r for r in rows if r["method"].startswith("kd "))
    assert f"gap recovered {want:.0%}" in kd["notes"]
    fkd = next(r for r in rows if r["case"] == "feature_kd_mnist1d")
    assert "gain over kd -0.0100" in fkd["notes"]


@pytest.mark.parametrize("data", ["digits", "mnist1d"])
def test_kd_setup_student_is_4x_smaller_and_alt_toggles_mixup(data):
    from netpress import zoo
    from netpress.distill import derive_student
    from netpress.measure import count_params

    setup = KD_SETUP[data]
    teacher = zoo.load_model({"digits": "digits_cnn", "mnist1d": "mnist1d_cnn"}[data])
    student = derive_student(teacher, width=setup["width"])
    assert count_params(teacher) / count_params(student) >= 4
    assert _augment(setup, "labels") == setup["augment"]
    assert _augment(setup, "labels_alt")["mixup"] == setup["alt_mixup"] != setup["augment"]["mixup"]
