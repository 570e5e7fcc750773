"""bench/distill.py: the KD rows measure the gap against the stronger label-only baseline; the
bench-trained ensemble teacher feeds KD and its own rows."""

from __future__ import annotations

import pytest
import torch

from netpress.bench import distill as bd
from netpress.bench.distill import KD_KINDS, KD_SETUP, _augment, kd_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def _seed(acc: dict[str, float]) -> dict:
    return {"acc": acc, "secs": dict.fromkeys(KD_KINDS, 1.0), "epochs": 40, "params": 2210}


def test_kd_rows_gap_against_the_stronger_baseline(monkeypatch):
    zoo_teacher = {k: v for k, v in KD_SETUP["digits"].items() if k != "teacher"}
    monkeypatch.setitem(KD_SETUP, "digits", zoo_teacher)  # the gap arithmetic, zoo CNN as teacher
    rows = kd_rows("digits", [_seed({"labels": 0.95, "labels_alt": 0.93, "kd": 0.97,
                                     "feature_kd": 0.96})] * 3)
    teacher = rows[0]["metric"]
    assert rows[0]["method"].startswith("teacher") and 0.9 < teacher < 1.0
    kd = next(r for r in rows if r["method"].startswith("kd "))
    want = (0.97 - 0.95) / (teacher - 0.95)
    assert f"gap recovered {want:.0%}" in kd["notes"]
    assert "stronger label-only baseline" in next(r for r in rows if r["method"] ==
                                                  "labels_only (student, CE)")["notes"]
    # swap the baselines: the gap follows the stronger one
    rows = kd_rows("digits", [_seed({"labels": 0.93, "labels_alt": 0.95, "kd": 0.97,
                                     "feature_kd": 0.96})] * 3)
    kd = next(r for r in rows if r["method"].startswith("kd "))
    assert f"gap recovered {want:.0%}" in kd["notes"]
    fkd = next(r for r in rows if r["case"] == "feature_kd_digits")
    assert "gain over kd -0.0100" in fkd["notes"]


@pytest.mark.parametrize("data", ["digits", "mnist1d"])
def test_kd_setup_student_is_4x_smaller_and_alt_differs(data):
    from netpress import zoo
    from netpress.distill import derive_student
    from netpress.measure import count_params

    setup = KD_SETUP[data]
    student = derive_student(zoo.load_model(bd.ZOO[data]), width=setup["width"])
    spec = setup.get("teacher")
    teacher = zoo.load_model(bd.ZOO[data]) if spec is None else bd._member(data, spec["width"])
    assert count_params(teacher) / count_params(student) >= 4  # one member alone
    assert _augment(setup, "labels") == setup["augment"]
    assert _augment(setup, "labels_alt")["mixup"] == setup["alt_mixup"]
    # the second baseline toggles mixup or trains for another number of epochs
    assert setup["alt_mixup"] != setup["augment"]["mixup"] or \
        bd._epochs(setup, "labels_alt") != bd._epochs(setup, "labels") == setup["epochs"]


def test_trained_teacher_feeds_kd_and_its_rows(monkeypatch):
    """A tiny stand-in of the MNIST-1D set-up: two members trained on train, their ensemble is the
    KD (and feature KD) teacher, and the rows report it and the zoo CNN separately."""
    from netpress import zoo

    tiny = dict(KD_SETUP["mnist1d"], epochs=4, test={"n": 500, "seed": 3},
                teacher={"width": 4, "members": 2, "epochs": 4, "lr": 0.01,
                         "augment": {"shift": 3, "noise": 0.05}})
    monkeypatch.setitem(KD_SETUP, "mnist1d", tiny)
    monkeypatch.setitem(bd.FEATURES, "mnist1d", [["5", "members.0.5"], ["11", "members.0.11"]])
    members = [bd.train_teacher("mnist1d", i, quick=True) for i in range(2)]
    assert members[0]["epochs"] == 1 and 0.0 < members[0]["acc"] < 1.0
    assert not torch.equal(members[0]["state"]["0.weight"], members[1]["state"]["0.weight"])
    ens = bd.kd_teacher("mnist1d", members)
    x = torch.randn(3, 1, 40)
    parts = [bd.kd_teacher("mnist1d", [m]) for m in members]
    torch.testing.assert_close(ens(x), (parts[0](x) + parts[1](x)) / 2)
    out = bd.kd_seed("mnist1d", 0, True, ("kd", "feature_kd"), members)
    assert set(out["acc"]) == {"kd", "feature_kd"}
    assert set(out["test"]) == {"kd", "feature_kd"}  # scored on the generated test set too
    rows = kd_rows("mnist1d", [{**out, "acc": {**out["acc"], "labels": 0.5, "labels_alt": 0.4},
                                "test": {**out["test"], "labels": 0.5, "labels_alt": 0.4},
                                "secs": dict.fromkeys(KD_KINDS, 1.0)}], members)
    assert rows[0]["method"].startswith("teacher: ensemble of 2")
    assert rows[0]["metric"] == round(bd._acc(ens, bd.test_batches("mnist1d")), 4)
    ev = bd._acc(ens, zoo.load_data("mnist1d").evaluation)
    assert f"evaluation split (1000): {ev:.4f}" in rows[0]["notes"]
    assert all(r["metric_name"] == "accuracy (test 500)" for r in rows)
    assert "not the KD teacher" in rows[1]["method"]
    # one member: the plain CNN (its layer names serve feature KD directly)
    assert isinstance(bd.kd_teacher("mnist1d", members[:1]), torch.nn.Sequential)
    with pytest.raises(ValueError, match="teacher members"):
        bd.kd_teacher("mnist1d", None)


def test_transfer_kd_uses_unlabelled_inputs_and_gets_its_own_row(monkeypatch):
    """``kd_transfer``: KD on the train split + target-less transfer batches from another
    generator seed (none equal to an evaluation input); its row is ``kd_mnist1d_transfer`` beside
    the same-data ``kd_mnist1d`` row, with the gap against the stronger label-only baseline."""
    tiny = dict(KD_SETUP["mnist1d"], width=0.125, epochs=4,
                transfer={"n": 300, "seed": 7, "epochs": 4})
    tiny.pop("teacher", None)
    tiny.pop("test", None)
    monkeypatch.setitem(KD_SETUP, "mnist1d", tiny)
    assert bd.kd_kinds("mnist1d")[-1] == "kd_transfer" and "kd_transfer" not in bd.kd_kinds("digits")
    tb, info = bd.transfer_batches("mnist1d", 128)
    assert [len(b.inputs[0]) for b in tb] == [128, 128, 44] and all(b.target is None for b in tb)
    assert info["n"] == 300 and info["seed"] == 7 and info["min_dist"] > 0.01
    out = bd.kd_seed("mnist1d", 0, True, ("kd_transfer",))
    assert 0.1 < out["acc"]["kd_transfer"] <= 1.0
    assert out["steps"]["kd_transfer"] == 1 * (32 + 3)  # 4000 / 128 labelled + 3 transfer batches
    per_seed = [{"acc": {"labels": 0.90, "labels_alt": 0.92, "kd": 0.93, "feature_kd": 0.93,
                         "kd_transfer": 0.95},
                 "secs": dict.fromkeys(bd.kd_kinds("mnist1d"), 1.0), "epochs": 1, "params": 900,
                 "steps": out["steps"], "transfer": out["transfer"]}] * 3
    rows = kd_rows("mnist1d", per_seed)
    tr = [r for r in rows if r["case"] == "kd_mnist1d_transfer"]
    assert len(tr) == 1 and "transfer set" in tr[0]["method"]
    teacher = rows[0]["metric"]
    assert f"gap recovered {(0.95 - 0.92) / (teacher - 0.92):.0%}" in tr[0]["notes"]
    assert "300 extra MNIST-1D inputs" in tr[0]["notes"] and "seed 7" in tr[0]["notes"]
    assert any(r["case"] == "kd_mnist1d" and r["method"].startswith("kd ") for r in rows)


def test_transfer_set_only_for_mnist1d():
    with pytest.raises(ValueError, match="no transfer set"):
        bd.transfer_batches("digits", 32)


def test_case_filter(monkeypatch):
    monkeypatch.delenv("NETPRESS_BENCH_DISTILL_CASES", raising=False)
    assert bd._wanted("tucker_digits")
    monkeypatch.setenv("NETPRESS_BENCH_DISTILL_CASES", "kd_mnist1d, deep_compression_mlp")
    assert bd._wanted("kd_mnist1d") and bd._wanted("deep_compression_mlp300_100")
    assert not bd._wanted("kd_digits") and not bd._wanted("tucker_mnist1d")


def test_test_set_is_held_out_from_the_transfer_set(monkeypatch):
    monkeypatch.setitem(KD_SETUP, "mnist1d", dict(KD_SETUP["mnist1d"], test={"n": 20, "seed": 1},
                                                  transfer={"n": 20, "seed": 1, "epochs": 1}))
    with pytest.raises(ValueError, match="share seed 1"):
        bd.test_batches("mnist1d")
    assert bd.test_batches("digits") is None
