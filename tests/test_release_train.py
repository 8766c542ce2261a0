"""The release's training recipe (facelayers.models.ssm.release_recipe).

Fixture tests: from each converted release checkpoint with a training record
(``NAME_train.safetensors`` in ``FACELAYERS_RELEASE_FIXTURES`` or ``tests/data/ssm_release``), two
steps of the recipe on the fixture batch (mixup off, router noise 0, the record's epoch) reproduce
what the released code's own ``_joint_training_step`` recorded. Unit tests: the objective, the
parameter groups, the schedule and the step on small models.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from facelayers.models.ssm.release_recipe import (
    RELEASE_OUTPUT_KEYS,
    ReleaseObjective,
    ReleaseRecipe,
    ReleaseRecipeConfig,
    freeze_text_towers_,
    release_optimizer,
    release_param_groups,
    release_scheduler,
    release_train_step,
    set_router_noise_,
)
from facelayers.training import ClipMixup, MovingMeanLossBalance, ParameterEMA, sigmoid_ramp


def _fixture_folder() -> Path:
    return Path(os.environ.get("FACELAYERS_RELEASE_FIXTURES", Path(__file__).parent / "data" / "ssm_release"))


def _train_fixture_names() -> list[str]:
    folder = _fixture_folder()
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len("_train.safetensors")] for p in folder.glob("*_train.safetensors"))


TRAIN_FIXTURES = _train_fixture_names()


def _load_fixture(name: str):
    from safetensors.torch import load_file

    folder = _fixture_folder()
    meta = json.loads((folder / f"{name}.json").read_text())
    io = load_file(str(folder / f"{name}_io.safetensors"))
    train = load_file(str(folder / f"{name}_train.safetensors"))
    return folder, meta, io, train


def _release_names_to_facelayers(model, release_sd, keys):
    """facelayers parameter name of each release key, found through the public converter: the keys
    are replaced by NaN and converted; the facelayers tensors holding NaN are theirs."""
    from facelayers.models.ssm.release import convert_release_state_dict

    out = {}
    for key in keys:
        probe = dict(release_sd)
        probe[key] = torch.full_like(release_sd[key], float("nan"))
        conv = convert_release_state_dict(probe, model)
        hit = [n for n, t in conv.items() if t.is_floating_point() and torch.isnan(t).any()]
        assert len(hit) == 1, f"release key {key} maps to {hit} (expected exactly one facelayers tensor)"
        out[key] = hit[0]
    return out


def _converted_as(release_sd, model, values):
    """The release state dict with ``values`` substituted, converted to facelayers names/layouts."""
    from facelayers.models.ssm.release import convert_release_state_dict

    sd = dict(release_sd)
    sd.update(values)
    return convert_release_state_dict(sd, model)


def test_training_fixtures_present():
    """The parity tests below must not silently vanish: the folder holds at least one record."""
    assert TRAIN_FIXTURES, f"no *_train.safetensors in {_fixture_folder()} (expected the release training fixtures)"


@pytest.mark.parametrize("name", TRAIN_FIXTURES)
def test_two_release_steps_reproduce_the_released_code(name):
    from facelayers.models.ssm.release import convert_release_checkpoint
    from facelayers.models.ssm.release_checkpoint import load_release_checkpoint, release_state_dict

    torch.manual_seed(0)
    folder, meta, io, train = _load_fixture(name)
    rec = meta["train_steps"]
    au_ds, exp_ds = meta["au_dataset"].lower(), meta["expression_dataset"].lower()
    model = convert_release_checkpoint(folder / f"{name}.pth", au_ds, exp_ds).train()
    release_sd = {k: v.float() if v.is_floating_point() else v
                  for k, v in release_state_dict(load_release_checkpoint(folder / f"{name}.pth")).items()}
    # the fixture's determinism switches: mixup off, router noise 0; everything else as released
    cfg = ReleaseRecipeConfig(mixup_alpha=0.0, router_noise=0.0)
    recipe = ReleaseRecipe(model, cfg)
    recipe.start_epoch(int(rec["epoch"]))
    assert recipe.objective.ramp(recipe.epoch) == pytest.approx(rec["ramp_a"], rel=1e-7)
    assert recipe.mixup is None and recipe.noisy_layers
    y_exp, y_au = train["y_exp"], train["y_au"]
    totals, norms, ce1 = [], [], []
    for _ in range(2):
        r = recipe.step(io["x_exp"], y_exp, io["x_au"], y_au)
        assert r.lam == 1.0 and r.perm is None
        totals.append(float(r.loss.total))
        norms.append(float(r.grad_norm))
        ce1.append(float(r.loss.terms[0]))
    assert totals == pytest.approx(rec["total_loss_per_step"], rel=1e-5), "total loss"
    assert norms == pytest.approx(rec["grad_norm_before_clipping_per_step"], rel=1e-5), "grad norm before clipping"
    assert ce1 == pytest.approx(rec["loss_exp_ce_per_step"], rel=1e-5), "expression CE"
    torch.testing.assert_close(recipe.objective.balance.means, train["moving_losses"], rtol=1e-5, atol=0,
                               msg="moving means after step 2")

    keys = sorted(k[len("after/"):] for k in train if k.startswith("after/"))
    assert keys and sorted(k[len("ema/"):] for k in train if k.startswith("ema/")) == keys
    names = _release_names_to_facelayers(model, release_sd, keys)
    want_after = _converted_as(release_sd, model, {k: train[f"after/{k}"] for k in keys})
    want_ema = _converted_as(release_sd, model, {k: train[f"ema/{k}"] for k in keys})
    before = _converted_as(release_sd, model, {})
    params = dict(model.named_parameters())
    for key, n in names.items():
        torch.testing.assert_close(params[n].detach(), want_after[n], rtol=0, atol=1e-6, msg=f"after/{key} ({n})")
        torch.testing.assert_close(recipe.ema.shadow[n], want_ema[n], rtol=0, atol=1e-6, msg=f"ema/{key} ({n})")
        # the step moved it as the release did (not merely left it near its start)
        moved, want_moved = params[n].detach() - before[n], want_after[n] - before[n]
        assert want_moved.abs().max() > 0, f"{key} did not move in the release's steps"
        torch.testing.assert_close(moved, want_moved, rtol=0, atol=1e-6 * max(1.0, float(want_moved.abs().max()) * 1e2),
                                   msg=f"displacement of {key} ({n})")

    # per-group sums of squares: the trainable sets and the groups' learning rates agree
    sums = {"encoder": 0.0, "delta_maps": 0.0, "other": 0.0}
    for n, p in model.named_parameters():
        if p.requires_grad:
            g = "encoder" if n.startswith("visual.") else "delta_maps" if n.startswith("mapping.delta_") else "other"
            sums[g] += float(p.detach().double().pow(2).sum())
    for g, want in rec["sum_of_squares_after_2_steps"].items():
        assert sums[g] == pytest.approx(want, rel=1e-6), f"sum of squares of group {g}"


@pytest.mark.parametrize("name", TRAIN_FIXTURES[:1])
def test_router_noise_is_seeded_and_switchable(name):
    from facelayers.models.ssm.release import convert_release_checkpoint, release_outputs

    folder, meta, io, _ = _load_fixture(name)
    model = convert_release_checkpoint(folder / f"{name}.pth", meta["au_dataset"].lower(),
                                       meta["expression_dataset"].lower()).train()
    x_exp, x_au = io["x_exp"][:1], io["x_au"][:1]
    layers = set_router_noise_(model, 0.5)
    assert layers and all(model.get_submodule(n).router.noise_std == 0.5 for n in layers)

    def run(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return release_outputs(model, x_exp, x_au)["au_logits"]

    assert torch.equal(run(1), run(1)), "seeded router noise must replay"
    assert not torch.equal(run(1), run(2)), "router noise had no effect"
    set_router_noise_(model, 0.0)
    assert torch.equal(run(1), run(2)), "router noise 0 must be deterministic"
    with pytest.raises(ValueError, match="expected std >= 0"):
        set_router_noise_(model, -1.0)


# ------------------------------------------------------------------------------------------------
# objective
# ------------------------------------------------------------------------------------------------
def _outputs(gen, b1=3, k=5, b2=2, t=4, m=3, dtype=torch.float64, requires_grad=False):
    out = {
        "exp_logits": torch.randn(b1, k, generator=gen, dtype=dtype),
        "exp_text_logits": torch.randn(b1, k, generator=gen, dtype=dtype),
        "au_logits": torch.randn(b2, t, m, generator=gen, dtype=dtype),
        "au_text_logits": torch.randn(b2, t, m, generator=gen, dtype=dtype),
    }
    if requires_grad:
        for v in out.values():
            v.requires_grad_(True)
    y_exp = torch.randint(0, k, (b1,), generator=gen)
    y_au = (torch.rand(b2, t, m, generator=gen) < 0.4).to(dtype)
    return out, y_exp, y_au


def _raw_terms(out, y_exp, y_au):
    m = y_au.shape[-1]
    return (F.cross_entropy(out["exp_logits"], y_exp),
            F.binary_cross_entropy_with_logits(out["au_logits"].reshape(-1, m), y_au.reshape(-1, m)),
            F.cross_entropy(out["exp_text_logits"], y_exp),
            F.binary_cross_entropy_with_logits(out["au_text_logits"].reshape(-1, m), y_au.reshape(-1, m)))


def test_objective_without_balance_is_the_release_formula():
    gen = torch.Generator().manual_seed(0)
    out, y_exp, y_au = _outputs(gen)
    obj = ReleaseObjective(balance=None)
    for epoch in (0, 3, 29, 40):
        res = obj(out, y_exp, y_au, epoch=epoch)
        l1, l2, l3, l4 = _raw_terms(out, y_exp, y_au)
        a = 2 / (1 + math.exp(-10 * epoch / 30)) - 1
        torch.testing.assert_close(res.total, (l1 + 2 * l2 + a * (l3 + l4)) / 3)
        assert res.ramp == pytest.approx(a, rel=1e-15)
        for got, want in zip(res.terms, (l1, l2, l3, l4)):
            torch.testing.assert_close(got, want)
        assert res.scaled == res.terms


def test_objective_moving_means_restart_each_epoch_and_are_detached():
    gen = torch.Generator().manual_seed(1)
    obj = ReleaseObjective(momentum=0.95, eps=1e-8, dtype=torch.float64)
    batches = [_outputs(gen, requires_grad=True) for _ in range(3)]
    # step 1 of an epoch: each term divided by itself
    res = obj(*batches[0], epoch=3)
    raw1 = torch.stack([t.detach() for t in _raw_terms(*batches[0])])
    torch.testing.assert_close(obj.balance.means, raw1)
    a = sigmoid_ramp(3, 30)
    torch.testing.assert_close(res.total.detach(), torch.tensor((3 + 2 * a) / 3, dtype=torch.float64), rtol=1e-7, atol=0)
    # step 2: m = 0.95 m + 0.05 L, and the gradient treats m as a constant
    out2, y_exp2, y_au2 = batches[1]
    res2 = obj(out2, y_exp2, y_au2, epoch=3)
    raw2 = _raw_terms(out2, y_exp2, y_au2)
    m2 = 0.95 * raw1 + 0.05 * torch.stack([t.detach() for t in raw2])
    torch.testing.assert_close(obj.balance.means, m2)
    manual = (raw2[0] / (m2[0] + 1e-8) + 2 * raw2[1] / (m2[1] + 1e-8) + a * (raw2[2] / (m2[2] + 1e-8) + raw2[3] / (m2[3] + 1e-8))) / 3
    torch.testing.assert_close(res2.total, manual)
    g = torch.autograd.grad(res2.total, list(out2.values()))
    g_manual = torch.autograd.grad(manual, list(out2.values()))
    for k, x, y in zip(out2, g, g_manual):
        torch.testing.assert_close(x, y, msg=f"d total / d {k}")
    # a new epoch restarts the means from the next losses
    obj.new_epoch()
    obj(*batches[2], epoch=4)
    torch.testing.assert_close(obj.balance.means, torch.stack([t.detach() for t in _raw_terms(*batches[2])]))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), epoch=st.integers(0, 60), b1=st.integers(1, 4), b2=st.integers(1, 3),
       t=st.integers(1, 5), m=st.integers(1, 4), k=st.integers(2, 6))
def test_objective_first_step_of_an_epoch_is_3_plus_2a_over_3(seed, epoch, b1, b2, t, m, k):
    gen = torch.Generator().manual_seed(seed)
    out, y_exp, y_au = _outputs(gen, b1=b1, k=k, b2=b2, t=t, m=m)
    obj = ReleaseObjective(dtype=torch.float64)
    res = obj(out, y_exp, y_au, epoch=epoch)
    a = sigmoid_ramp(epoch, 30)
    want = sum(w * x / (x + 1e-8) for w, x in zip((1, 2, a, a), [float(v) for v in res.terms])) / 3
    assert float(res.total) == pytest.approx(want, rel=1e-12)
    assert 0.0 <= res.ramp < 1.0


def test_objective_ramp_zero_at_epoch_0_silences_the_text_terms():
    gen = torch.Generator().manual_seed(2)
    out, y_exp, y_au = _outputs(gen, requires_grad=True)
    res = ReleaseObjective()(out, y_exp, y_au, epoch=0)
    g_exp_text, g_au_text, g_exp = torch.autograd.grad(
        res.total, [out["exp_text_logits"], out["au_text_logits"], out["exp_logits"]])
    assert torch.count_nonzero(g_exp_text) == 0 and torch.count_nonzero(g_au_text) == 0
    assert torch.count_nonzero(g_exp) > 0


def test_objective_mixup_terms_and_flat_layout():
    gen = torch.Generator().manual_seed(3)
    out, y_exp, y_au = _outputs(gen)
    perm = torch.tensor([1, 0])
    lam = 0.3
    obj = ReleaseObjective(balance=None)
    res = obj(out, y_exp, y_au, epoch=5, y_au_mix=y_au[perm], lam=lam)
    m = y_au.shape[-1]

    def bce(x, y):
        return F.binary_cross_entropy_with_logits(x.reshape(-1, m), y.reshape(-1, m))

    torch.testing.assert_close(res.terms[1], lam * bce(out["au_logits"], y_au) + (1 - lam) * bce(out["au_logits"], y_au[perm]))
    torch.testing.assert_close(res.terms[3], lam * bce(out["au_text_logits"], y_au)
                               + (1 - lam) * bce(out["au_text_logits"], y_au[perm]))
    # the release's flat [B2*T, M] outputs give the same loss
    flat = dict(out, au_logits=out["au_logits"].reshape(-1, m), au_text_logits=out["au_text_logits"].reshape(-1, m))
    torch.testing.assert_close(obj(flat, y_exp, y_au, epoch=5, y_au_mix=y_au[perm], lam=lam).total, res.total)


def test_objective_bad_input_is_named():
    gen = torch.Generator().manual_seed(4)
    out, y_exp, y_au = _outputs(gen)
    obj = ReleaseObjective()
    with pytest.raises(KeyError, match="missing \\['au_text_logits'\\]"):
        obj({k: v for k, v in out.items() if k != "au_text_logits"}, y_exp, y_au, epoch=0)
    with pytest.raises(ValueError, match="expected matching shapes"):
        obj(out, y_exp, y_au[..., :2], epoch=0)
    with pytest.raises(ValueError, match="expected the same B2\\*T"):
        obj(out, y_exp, y_au[:1], epoch=0)
    with pytest.raises(ValueError, match="expected matching B1"):
        obj(out, y_exp[:2], y_au, epoch=0)
    with pytest.raises(ValueError, match="y_au_mix must have the shape of y_au"):
        obj(out, y_exp, y_au, epoch=0, y_au_mix=y_au[:1])
    with pytest.raises(ValueError, match="expected a 0-based epoch"):
        obj(out, y_exp, y_au, epoch=-1)
    with pytest.raises(ValueError, match="balance must be"):
        ReleaseObjective(balance="ema")
    assert "au_weight=2.0" in repr(ReleaseObjective())


# ------------------------------------------------------------------------------------------------
# parameter groups, schedule, config
# ------------------------------------------------------------------------------------------------
class _Mapping(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.delta_au2exp = nn.Parameter(torch.zeros(3, 2))
        self.delta_exp2au = nn.Parameter(torch.zeros(2, 3))
        self.alpha_param = nn.Parameter(torch.tensor(0.1))


class _Toy(nn.Module):
    """The parts the recipe cares about: a vision tower, a frozen text tower, the DPM deltas, heads."""

    def __init__(self, k: int = 3, m: int = 2, d: int = 4) -> None:
        super().__init__()
        self.visual = nn.Linear(6, d)
        self.text = nn.Linear(d, d)
        self.text.requires_grad_(False)
        self.mapping = _Mapping()
        self.exp_head = nn.Linear(d, k)
        self.au_head = nn.Linear(d, m)
        self.tied = self.exp_head.weight  # shared parameter: must appear once

    def outputs(self, x_exp, x_au):
        f_exp = self.visual(x_exp.flatten(2)).mean(1)          # [B1, D]
        f_au = self.visual(x_au.flatten(2))                    # [B2, T, D]
        t = self.text.weight
        a = self.mapping.delta_au2exp.sum() + self.mapping.delta_exp2au.sum() * self.mapping.alpha_param
        return {"exp_logits": self.exp_head(f_exp) + a, "exp_text_logits": self.exp_head(f_exp @ t),
                "au_logits": self.au_head(f_au), "au_text_logits": self.au_head(f_au @ t) * (1 + a)}


def _toy_forward(model, x_exp, x_au):
    return model.outputs(x_exp, x_au)


def test_param_groups_are_the_release_groups():
    model = _Toy()
    groups = release_param_groups(model)
    assert [g["name"] for g in groups] == ["vision", "delta_au2exp", "delta_exp2au", "other"]
    assert [g["lr"] for g in groups] == [1e-6, 1e-2, 1e-2, 1e-4]
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable, "every trainable parameter exactly once"
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.visual.parameters()}
    assert groups[1]["params"][0] is model.mapping.delta_au2exp and groups[2]["params"][0] is model.mapping.delta_exp2au
    assert not any(id(p) in set(ids) for p in model.text.parameters())
    opt = release_optimizer(model)
    assert isinstance(opt, torch.optim.AdamW) and all(g["weight_decay"] == 1e-4 for g in opt.param_groups)
    with pytest.raises(ValueError, match="pass delta_names=\\(\\)"):
        release_param_groups(nn.Linear(2, 2))
    assert [g["name"] for g in release_param_groups(nn.Linear(2, 2), delta_names=())] == ["other"]


def test_scheduler_is_multistep_15_25():
    model = _Toy()
    opt = release_optimizer(model)
    sched = release_scheduler(opt)
    seen = []
    for epoch in range(30):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for epoch, lrs in enumerate(seen):
        f = 1.0 if epoch < 15 else 0.1 if epoch < 25 else 0.01
        assert lrs == pytest.approx([1e-6 * f, 1e-2 * f, 1e-2 * f, 1e-4 * f], rel=1e-12), f"epoch {epoch}"


def test_freeze_text_towers_freezes_only_the_tower():
    from facelayers.models.ssm.release import build_release_model

    name = TRAIN_FIXTURES[0] if TRAIN_FIXTURES else pytest.skip("no release fixtures")
    from facelayers.models.ssm.release import infer_release_architecture
    from facelayers.models.ssm.release_checkpoint import load_release_checkpoint, release_state_dict

    folder, meta, _, _ = _load_fixture(name)
    sd = release_state_dict(load_release_checkpoint(folder / f"{name}.pth"))
    model = build_release_model(infer_release_architecture(sd, meta["au_dataset"].lower(), meta["expression_dataset"].lower()))
    model.requires_grad_(True)
    frozen = freeze_text_towers_(model)
    assert frozen and all(".tower." in n for n in frozen)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".tower." in n)
    assert model.text.expression_prompts.ctx.requires_grad and model.visual.conv1.weight.requires_grad
    assert freeze_text_towers_(model) == []


def test_config_round_trip_and_validation():
    c = ReleaseRecipeConfig()
    assert c.milestones == (15, 25) and c.epochs == 30 and c.ema_decay == 0.99 and c.mixup_alpha == 0.4
    d = json.loads(json.dumps(c.to_json()))
    assert ReleaseRecipeConfig.from_json(d) == c
    with pytest.raises(ValueError, match="unknown release recipe keys"):
        ReleaseRecipeConfig.from_json({"lr": 1.0})
    with pytest.raises(ValueError, match="milestones must be increasing"):
        ReleaseRecipeConfig(milestones=(25, 15))
    with pytest.raises(ValueError, match="expected ema_decay <= 1.0"):
        ReleaseRecipeConfig(ema_decay=1.5)
    with pytest.raises(ValueError, match="loss_balance must be"):
        ReleaseRecipeConfig(loss_balance="uncertainty")
    with pytest.raises(ValueError, match="expected mixup_alpha >= 0.0"):
        ReleaseRecipeConfig(mixup_alpha=-0.1)


# ------------------------------------------------------------------------------------------------
# the step, against an independent transcription of the release's step
# ------------------------------------------------------------------------------------------------
def _toy_batch(seed, b1=2, b2=3, t=4, k=3, m=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b1, t, 6, generator=g), torch.randint(0, k, (b1,), generator=g),
            torch.randn(b2, t, 6, generator=g), (torch.rand(b2, t, m, generator=g) < 0.5).float())


def _manual_release_steps(model, batches, epoch, alpha, seed):
    """The release's step written out (its formulas, torch's AdamW): the reference for the toy tests."""
    opt = torch.optim.AdamW([{"params": model.visual.parameters(), "lr": 1e-6},
                             {"params": [model.mapping.delta_au2exp], "lr": 1e-2},
                             {"params": [model.mapping.delta_exp2au], "lr": 1e-2},
                             {"params": [p for n, p in model.named_parameters()
                                         if not n.startswith(("visual", "mapping.delta_")) and p.requires_grad],
                              "lr": 1e-4}], weight_decay=1e-4)
    shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    mix = ClipMixup(alpha, generator=torch.Generator().manual_seed(seed))
    moving = None
    totals = []
    for x_exp, y_exp, x_au, y_au in batches:
        opt.zero_grad()
        if alpha > 0:
            lam, perm = mix.sample_lam(), mix.sample_perm(x_au.shape[0])
            x_au, y_b = lam * x_au + (1 - lam) * x_au[perm], y_au[perm]
        else:
            lam, y_b = 1.0, y_au
        out = model.outputs(x_exp, x_au)
        m = y_au.shape[-1]
        ya, yb = y_au.reshape(-1, m), y_b.reshape(-1, m)
        bce = nn.BCEWithLogitsLoss()
        l1 = nn.CrossEntropyLoss()(out["exp_logits"], y_exp)
        l2 = lam * bce(out["au_logits"].reshape(-1, m), ya) + (1 - lam) * bce(out["au_logits"].reshape(-1, m), yb)
        l3 = nn.CrossEntropyLoss()(out["exp_text_logits"], y_exp)
        l4 = lam * bce(out["au_text_logits"].reshape(-1, m), ya) + (1 - lam) * bce(out["au_text_logits"].reshape(-1, m), yb)
        ls = [l1, l2, l3, l4]
        moving = [x.detach() for x in ls] if moving is None else [0.95 * mv + 0.05 * x.detach() for mv, x in zip(moving, ls)]
        s = [x / (mv + 1e-8) for x, mv in zip(ls, moving)]
        a = 2 / (1 + math.exp(-10 * epoch / 30)) - 1
        total = (s[0] + 2.0 * s[1] + a * (s[2] + s[3])) / 3.0
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    shadow[n] = 0.99 * shadow[n] + 0.01 * p
        totals.append(float(total.detach()))
    return totals, shadow, torch.stack(moving)


@pytest.mark.parametrize("alpha", [0.0, 0.4], ids=["mixup-off", "mixup-0.4"])
def test_recipe_steps_match_a_transcription_of_the_release_step(alpha):
    torch.manual_seed(0)
    ref = _Toy()
    ours = _Toy()
    ours.load_state_dict(ref.state_dict())
    batches = [_toy_batch(s) for s in range(3)]
    want_totals, want_shadow, want_means = _manual_release_steps(ref, batches, epoch=4, alpha=alpha, seed=7)
    recipe = ReleaseRecipe(ours, ReleaseRecipeConfig(mixup_alpha=alpha, router_noise=None),
                           generator=torch.Generator().manual_seed(7), forward=_toy_forward)
    recipe.start_epoch(4)
    got = [float(recipe.step(*b).loss.total) for b in batches]
    assert got == pytest.approx(want_totals, rel=1e-6)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(dict(ours.named_parameters())[n], p, rtol=0, atol=1e-7, msg=n)
        if p.requires_grad:
            torch.testing.assert_close(recipe.ema.shadow[n], want_shadow[n], rtol=0, atol=1e-7, msg=f"ema {n}")
    torch.testing.assert_close(recipe.objective.balance.means, want_means, rtol=1e-6, atol=0)


def test_mixup_is_seeded_and_mixes_only_au_clips():
    x_exp, y_exp, x_au, y_au = _toy_batch(0, b2=5)
    seen = {}

    def spy(model, e, a):
        seen["exp"], seen["au"] = e, a
        return model.outputs(e, a)

    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = _Toy()
        recipe = ReleaseRecipe(model, ReleaseRecipeConfig(mixup_alpha=0.4), generator=torch.Generator().manual_seed(3),
                               forward=spy)
        r = recipe.step(x_exp, y_exp, x_au, y_au)
        assert seen["exp"] is x_exp, "expression clips are not mixed"
        torch.testing.assert_close(seen["au"], r.lam * x_au + (1 - r.lam) * x_au[r.perm])
        assert sorted(r.perm.tolist()) == list(range(5)) and 0.0 <= r.lam <= 1.0
        runs.append((r.lam, r.perm.tolist(), float(r.loss.total)))
    assert runs[0] == runs[1], "the same mixup seed must replay the same step"
    off = ReleaseRecipe(_Toy(), ReleaseRecipeConfig(mixup_alpha=0.0), forward=spy)
    r = off.step(x_exp, y_exp, x_au, y_au)
    assert off.mixup is None and r.lam == 1.0 and r.perm is None and seen["au"] is x_au


def test_recipe_switches_ema_clip_balance_and_epochs():
    x = _toy_batch(1)
    model = _Toy()
    recipe = ReleaseRecipe(model, ReleaseRecipeConfig(ema_decay=None, grad_clip=None, loss_balance="none",
                                                      mixup_alpha=0.0), forward=_toy_forward)
    assert recipe.ema is None and recipe.objective.balance is None
    r = recipe.step(*x)
    assert r.grad_norm is None
    torch.testing.assert_close(r.loss.scaled[0], r.loss.terms[0])
    with recipe.averaged() as m:  # a no-op without EMA
        assert m is model
    # with EMA the averaged weights are swapped in and the live ones restored after
    model2 = _Toy()
    rec2 = ReleaseRecipe(model2, ReleaseRecipeConfig(mixup_alpha=0.0), forward=_toy_forward)
    start = model2.exp_head.bias.detach().clone()
    rec2.step(*x)
    live = model2.exp_head.bias.detach().clone()
    with rec2.averaged():
        torch.testing.assert_close(model2.exp_head.bias.detach(), 0.99 * start + 0.01 * live)
    assert torch.equal(model2.exp_head.bias.detach(), live)
    # epochs: end_epoch steps the schedule and advances; start_epoch restarts the means
    assert bool(rec2.objective.balance.started)
    rec2.end_epoch()
    assert rec2.epoch == 1
    rec2.start_epoch()
    assert not bool(rec2.objective.balance.started)
    keep = ReleaseRecipe(_Toy(), ReleaseRecipeConfig(restart_balance_each_epoch=False, mixup_alpha=0.0),
                         forward=_toy_forward)
    keep.step(*x)
    keep.start_epoch(1)
    assert bool(keep.objective.balance.started)
    with pytest.raises(ValueError, match="expected a 0-based epoch"):
        keep.start_epoch(-1)
    d = json.loads(json.dumps(rec2.describe()))
    assert d["recipe"] == "ssm_release" and [g["name"] for g in d["param_groups"]][0] == "vision"
    assert d["config"] == rec2.config.to_json() and d["ema"]["decay"] == 0.99 and d["mixup"] is None


def test_step_bad_input_is_named():
    x_exp, y_exp, x_au, y_au = _toy_batch(0)
    recipe = ReleaseRecipe(_Toy(), ReleaseRecipeConfig(mixup_alpha=0.0), forward=_toy_forward)
    with pytest.raises(ValueError, match="one target per AU clip"):
        recipe.step(x_exp, y_exp, x_au, y_au[:1])
    with pytest.raises(ValueError, match="expected grad_clip > 0.0"):
        release_train_step(recipe.model, x_exp, y_exp, x_au, y_au, objective=recipe.objective,
                           optimizer=recipe.optimizer, epoch=0, grad_clip=0.0, forward=_toy_forward)
    with pytest.raises(TypeError, match="ReleaseRecipeConfig"):
        ReleaseRecipe(_Toy(), {"epochs": 3}, forward=_toy_forward)  # type: ignore[arg-type]


def test_output_keys_are_the_release_outputs():
    assert set(RELEASE_OUTPUT_KEYS) == {"exp_logits", "au_logits", "exp_text_logits", "au_text_logits"}
    assert isinstance(ReleaseObjective().balance, MovingMeanLossBalance)
    recipe = ReleaseRecipe(_Toy(), ReleaseRecipeConfig(mixup_alpha=0.0), forward=_toy_forward)
    assert isinstance(recipe.ema, ParameterEMA) and recipe.ema.decay == 0.99


# ------------------------------------------------------------------------------------------------
# the release preset from CLIP weights
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu-clip", "quickgelu-clip"])
def test_release_model_from_clip_copies_the_towers_and_embeds_the_prompts(quick_gelu):
    import open_clip

    from facelayers import facs
    from facelayers.models.ssm import TINY_CLIP
    from facelayers.models.ssm.release import ReleaseSSMModel
    from facelayers.models.ssm.release_recipe import release_model_from_clip
    from facelayers.moe import iter_moe_layers
    from facelayers.prompts import StoredPromptLearner

    torch.manual_seed(0)
    clip = open_clip.CLIP(**TINY_CLIP, quick_gelu=quick_gelu).eval()
    n_layers = len(clip.visual.transformer.resblocks)
    model = release_model_from_clip(clip, "disfa", "mafw", num_frames=4, moe_blocks=range(n_layers), n_ctx=4).eval()
    assert isinstance(model, ReleaseSSMModel) and model.training is False
    r = model.release
    assert (r.au_dataset, r.expression_dataset, r.num_frames, r.n_ctx) == ("disfa", "mafw", 4, 4)
    assert (r.vision_width, r.vision_layers, r.vision_heads, r.embed_dim) == (64, n_layers, 2, 64)
    assert r.moe_blocks == tuple(range(n_layers)) and r.exp_depth == 1 and r.smooth_kernel == 5
    with torch.no_grad():
        # text: with the context set to the embedding of "X", each prompt is CLIP's text feature of
        # "X X X X <release description>" (same activation: the tower is QuickGELU like OpenAI CLIP)
        exp_texts, au_texts = facs.release_descriptions("disfa", "mafw")
        for learner, texts in ((model.text.expression_prompts, exp_texts), (model.text.au_prompts, au_texts)):
            ids = StoredPromptLearner.release_token_ids(learner.tower, texts, 4)
            x_emb = clip.token_embedding(ids[:, 1:5])
            learner.ctx.copy_(x_emb.reshape(learner.ctx.shape) if learner.ctx.dim() == 3 else x_emb[0])
            got = learner()
            if quick_gelu:
                want = F.normalize(clip.encode_text(ids), dim=-1)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg="prompt features")
            assert got.shape == (len(texts), 64)
        # vision: MoE gates at 0 leave the shared experts = CLIP's MLPs (the release's shared expert
        # uses exact GELU, so compare with a GELU CLIP)
        for layer in iter_moe_layers(model.visual):
            layer.gamma.zero_()
        x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        if not quick_gelu:
            torch.testing.assert_close(model.visual(x), clip.visual(x), rtol=1e-5, atol=1e-6, msg="vision features")
    assert torch.equal(model.visual.conv1.weight, clip.visual.conv1.weight)
    assert all(not p.requires_grad for p in model.text.expression_prompts.tower.parameters())
    with pytest.raises(ValueError, match="even int"):
        release_model_from_clip(clip, "bp4d", "dfew", num_frames=3)
    with pytest.raises(ValueError, match="unknown temporal settings"):
        release_model_from_clip(clip, "bp4d", "dfew", num_frames=4, exp_layers=2)
    with pytest.raises(ValueError, match="needs an open_clip CLIP"):
        release_model_from_clip(nn.Linear(2, 2), "bp4d", "dfew")


# ------------------------------------------------------------------------------------------------
# the reference script's --recipe ssm_release and the pieces on their own
# ------------------------------------------------------------------------------------------------
def _script():
    from _testutils import load_example

    return load_example("ssm_reference")


def test_script_recipe_ssm_release_quick_records_every_option(tmp_path):
    import time

    R = _script()
    out = tmp_path / "rel"
    t0 = time.time()
    assert R.main(["--recipe", "ssm_release", "--quick", "--out", str(out), "--no-progress", "--no-plots"]) == 0
    assert time.time() - t0 < 60, "--recipe ssm_release --quick must run in under a minute on CPU"
    rec = json.loads((out / "recipe.json").read_text())
    m = json.loads((out / "metrics.json").read_text())
    assert m["recipe"] == rec and rec["recipe"] == "ssm_release"
    assert (rec["ema_decay"], rec["mixup_alpha"], rec["loss_balance"], rec["router_noise"], rec["au_select"]) == \
        (0.99, 0.4, "moving_mean", 0.01, "all")
    cfg = rec["release_recipe"]["config"]
    assert ReleaseRecipeConfig.from_json(cfg).ema_decay == 0.99 and cfg["mixup_alpha"] == 0.4
    assert [g["name"] for g in rec["release_recipe"]["param_groups"]] == ["vision", "delta_au2exp", "delta_exp2au", "other"]
    assert rec["release_architecture"]["au_dataset"] == "bp4d" and rec["release_architecture"]["num_frames"] == 4
    assert m["selection"] == {"split": "val", "optimistic": False}
    assert {"loss_exp_text", "loss_au_text"} <= set(m["history"][0])
    assert "recipe=ssm_release" in (out / "summary.txt").read_text()
    # the selected checkpoint is the release preset in its own format
    from facelayers.models.ssm.release import is_release_checkpoint, load_release_model

    assert is_release_checkpoint(out / "checkpoint", "best")
    assert load_release_model(out / "checkpoint", "best").release.num_frames == 4
    # the release's data choices are in force and recorded (no longer under not_reproduced)
    from facelayers.data import CLIP_MEAN, CLIP_STD

    data = rec["data"]
    assert (data["au_train_windows"], data["exp_sampling"], data["random_erasing_p"]) == ("full", "release", 0.0)
    assert data["normalisation"] == {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}
    assert data["exp_sampling_applies"] is False  # synthetic clips are rendered with exactly T frames
    assert not any("data choices" in x or "tuned" in x for x in rec["not_reproduced"])
    assert m["args"]["au_train_windows"] == "full" and m["args"]["erase_p"] == 0.0
    # the release's tuned AU F1 beside F1@0.5, under its own name, marked optimistic
    au = m["test"]["au"]
    tuned = au["au_f1_tuned_release"]
    assert 0.0 <= au["f1_mean"] <= 1.0 and tuned["name"] == "au_f1_tuned_release (optimistic)"
    assert tuned["optimistic"] is True and 0.0 <= tuned["mean"] <= 1.0
    assert tuned["frames"] == au["n"] and set(tuned["per_au"]) == set(au["f1_per_au"])
    assert rec["tuned_au_f1"] == "on"
    summary = (out / "summary.txt").read_text()
    assert "AU F1@0.5 (mean)" in summary and "au_f1_tuned_release (optimistic)" in summary


def test_script_pieces_alone_and_select_on_test_marked_optimistic(tmp_path):
    R = _script()
    out = tmp_path / "pieces"
    assert R.main(["--quick", "--out", str(out), "--no-progress", "--no-plots", "--ema-decay", "0.9",
                   "--mixup-alpha", "0.4", "--loss-balance", "moving_mean", "--router-noise", "0.01",
                   "--select-on", "test"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["recipe"]["recipe"] == "paper" and m["recipe"]["ema_decay"] == 0.9 and m["recipe"]["mixup_alpha"] == 0.4
    assert m["selection"] == {"split": "test", "optimistic": True}
    assert all(part["optimistic"] is True for part in m["test"].values())
    assert "test/score" in m["history"][0] and "val/score" not in m["history"][0]
    table = (out / "summary.txt").read_text()
    assert "test*" in table and "OPTIMISTIC" in table
    assert (out / "checkpoint" / "ema.safetensors").is_file()


def test_script_recipe_bad_combinations_are_usage_errors(tmp_path, capsys):
    R = _script()
    base = ["--quick", "--no-progress", "--no-plots", "--out", str(tmp_path / "x")]
    cases = [(["--recipe", "ssm_release", "--au-select", "center"], "--au-select"),
             (["--recipe", "ssm_release", "--frames", "5"], "--frames"),
             (["--recipe", "ssm_release", "--mode", "baseline"], "--recipe ssm_release"),
             (["--recipe", "ssm_release", "--resume"], "--resume"),
             (["--lr-delta", "0.1"], "--lr-delta"),
             (["--ema-decay", "1.5"], "--ema-decay"),
             (["--select-on", "train"], "--select-on")]
    for extra, needle in cases:
        assert R.main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert needle in err and "expected" in err, (extra, err)


def test_script_pieces_resume_with_ema_and_mixup_state(tmp_path):
    R = _script()
    out = tmp_path / "resume"
    flags = ["--quick", "--out", str(out), "--no-progress", "--no-plots", "--ema-decay", "0.9", "--mixup-alpha", "0.4"]
    assert R.main(flags) == 0
    ema_1 = (out / "checkpoint" / "ema.safetensors").read_bytes()
    assert R.main(flags + ["--resume", "--epochs", "2"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    assert (out / "checkpoint" / "ema.safetensors").read_bytes() != ema_1, "the EMA kept training after the resume"


def test_script_data_choices_and_tuned_f1_on_their_own(tmp_path):
    """The release's AU windows and tuned AU F1 with the paper recipe and centre-frame supervision
    (the per-window output path of the frame table)."""
    R = _script()
    out = tmp_path / "data"
    assert R.main(["--quick", "--out", str(out), "--no-progress", "--no-plots", "--au-train-windows", "full",
                   "--tuned-au-f1", "on"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    rec = json.loads((out / "recipe.json").read_text())
    assert rec["recipe"] == "paper" and rec["au_select"] == "center" and rec["data"]["au_train_windows"] == "full"
    assert rec["data"]["exp_sampling"] == "segments" and rec["tuned_au_f1"] == "on"
    tuned = m["test"]["au"]["au_f1_tuned_release"]
    assert tuned["optimistic"] is True and tuned["frames"] == m["test"]["au"]["n"]
    assert "f1_mean" in m["test"]["au"]
    assert "au_f1_tuned_release (optimistic)" in (out / "summary.txt").read_text()


def test_script_data_choice_usage_errors(tmp_path, capsys):
    R = _script()
    base = ["--quick", "--no-progress", "--no-plots", "--out", str(tmp_path / "x")]
    cases = [(["--erase-p", "0"], "--erase-p"),
             (["--exp-sampling", "release"], "--exp-sampling"),
             (["--data", "real", "--erase-p", "1.5"], "--erase-p"),
             (["--au-train-windows", "tails"], "--au-train-windows"),
             (["--mode", "stl", "--task", "exp", "--tuned-au-f1", "on"], "--tuned-au-f1")]
    for extra, needle in cases:
        assert R.main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert needle in err and ("expected" in err or "invalid choice" in err), (extra, err)

