"""P6 cubic schedule with fine-tuning and the lottery ticket: sparsity path, masks, reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from netpress.api import prune as apply_prune
from netpress.core.config import StageContext, parse_config
from netpress.core.data import as_batches
from netpress.core.errors import RecipeError
from netpress.core.recipe import Recipe
from netpress.export.artifact import load, save_artifact
from netpress.prune.lottery import per_round_fraction, prune_lottery, random_reinit, ticket_masks
from netpress.prune.magnitude import prune_magnitude
from netpress.prune.schedule import cubic_sparsity, event_steps
from netpress.zoo.trained import digits_cnn

pytestmark = pytest.mark.usefixtures("one_thread")



def test_cubic_schedule_follows_zhu_and_gupta() -> None:
    s = [cubic_sparsity(k, 10, 0.1, 0.9) for k in range(11)]
    assert s[0] == pytest.approx(0.1) and s[10] == 0.9
    assert s[5] == pytest.approx(0.9 + (0.1 - 0.9) * 0.5**3)
    steps = [b - a for a, b in zip(s, s[1:], strict=False)]
    assert all(x > y for x, y in zip(steps, steps[1:], strict=False))  # fast first, then slower
    assert event_steps(100, 0.7, 7) == {10: 1, 20: 2, 30: 3, 40: 4, 50: 5, 60: 6, 70: 7}


@pytest.fixture
def digits_like() -> list:
    g = torch.Generator().manual_seed(3)
    X = torch.rand(128, 1, 8, 8, generator=g)
    y = (X[:, 0, :, :4].sum((1, 2)) > X[:, 0, :, 4:].sum((1, 2))).long()
    return as_batches((X, y), batch_size=32)


def test_gradual_magnitude_reaches_target_and_reloads(digits_like, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = digits_cnn(16).eval()  # the zoo architecture, so the artifact reloads by name
    spec = {"method": "magnitude", "sparsity": 0.9, "scope": "global", "schedule": "cubic",
            "prune_steps": 4, "prune_end": 0.5, "finetune": {"epochs": 3, "lr": 1e-2}}
    Recipe.from_dict({"model": "zoo:digits_cnn", "stages": [{"prune": spec}]})  # recipe spelling
    ctx = StageContext(data=digits_like, original=model)
    pruned = prune_magnitude(model, parse_config("prune", spec), ctx)
    rep = ctx.report["schedule"]
    assert rep["steps"] == 12
    assert [s for _, s in rep["events"]] == pytest.approx(
        [cubic_sparsity(k, 4, 0.0, 0.9) for k in range(5)], abs=1e-6)
    assert [t for t, _ in rep["events"]] == [0, 2, 3, 4, 6]  # round(k * 6 / 4)
    weights = [m.weight for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    total = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == int(0.9 * total)
    dense_dir, sparse_dir = tmp_path / "dense", tmp_path / "sparse"
    src = {"kind": "zoo", "name": "digits_cnn"}
    save_artifact(digits_cnn(16), dense_dir, source=src, recipe={})
    save_artifact(pruned, sparse_dir, source=src, recipe={})
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(sparse_dir) < 0.2 * size(dense_dir)  # measured 0.15
    back = load(sparse_dir)
    x = digits_like[0].inputs[0]
    assert torch.equal(back(x), pruned(x))


def test_schedule_needs_a_fraction() -> None:
    with pytest.raises(RecipeError, match="schedule"):
        apply_prune(nn.Sequential(nn.Linear(8, 8)), {"method": "magnitude", "sparsity": "2:4",
                                                     "schedule": "cubic"},
                    data=(torch.randn(8, 8), torch.zeros(8, dtype=torch.long)))
    with pytest.raises(RecipeError, match="schedule"):
        Recipe.from_dict({"model": "zoo:digits_cnn",
                          "stages": [{"prune": {"method": "magnitude", "sparsity": 0.9,
                                                "schedule": "linear"}}]})


def test_lottery_ticket_rounds_rewind_and_control(digits_like) -> None:
    assert per_round_fraction(0.75, 2) == pytest.approx(0.5)
    torch.manual_seed(0)
    init = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2))
    theta0 = {k: v.clone() for k, v in init.state_dict().items()}
    cfg = parse_config("prune", {"method": "lottery", "sparsity": 0.75, "rounds": 2,
                                 "rewind_steps": 0, "finetune": {"epochs": 2, "lr": 1e-2}})
    ctx = StageContext(data=digits_like)
    ticket = prune_lottery(init, cfg, ctx)
    rep = ctx.report["lottery"]
    assert [r["sparsity"] for r in rep["rounds"]] == pytest.approx([0.5, 0.75], abs=2e-3)
    masks = ticket_masks(ticket, list(rep["layers"]))
    # rewind_steps 0: survivors restarted from θ0 in every round (then retrained), so the ticket
    # differs from θ0 but shares its zeros pattern with the final mask
    assert not torch.equal(ticket[1].weight, theta0["1.weight"])
    assert sum(int(m.sum()) for m in masks.values()) == pytest.approx(0.25 * (64 * 32 + 32 * 2),
                                                                     abs=2)
    control = random_reinit(ticket, masks, seed=7)
    for name, keep in masks.items():
        w = dict(control.named_modules())[name].weight
        assert bool((w[~keep] == 0).all()) and not torch.equal(w, dict(ticket.named_modules())[
            name].weight)
    x = digits_like[0].inputs[0]
    assert torch.isfinite(ticket(x)).all() and torch.isfinite(control(x)).all()
