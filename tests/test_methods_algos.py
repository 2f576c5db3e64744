"""The label-noise methods as algorithms (NLPrompt, JoAPR, Co-teaching), on synthetic tensors only.

No backbone, no training loop: well-separated synthetic CLIP-like features (C class directions in E
dimensions; an image feature is its class direction plus a little noise, normalised; the class text
features are the directions; logits = 100 * cosine), with planted label flips. Each method is driven
through the `Method` contract (`begin_epoch`, `inputs`, `loss`, `epoch_log`) as the loop drives it.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dspt.errors import ConfigError
from dspt.losses import get_loss
from dspt.methods import METHODS, EpochView, check_method, get_method

# importing the modules registers "coteaching", "joapr" and "nlprompt"
from dspt.methods.coteaching import CoTeaching, forget_rate_at, keep_count
from dspt.methods.joapr import JoAPR, gaussian_crossing, mix_draw, partition, sharpen
from dspt.methods.nlprompt import NLPrompt, SinkhornWarning, prompt_ot

C, E, N, SCALE, FLIP = 5, 16, 400, 100.0, 0.3


def synthetic(seed: int = 0, spread: float = 0.1, n: int = N) -> dict[str, torch.Tensor]:
    """Features, true and given labels with round(FLIP * n) planted flips (to another class, uniform)."""
    g = torch.Generator().manual_seed(seed)
    dirs = F.normalize(torch.randn(C, E, generator=g), dim=1)
    y = torch.arange(n) % C
    img = F.normalize(dirs[y] + spread * torch.randn(n, E, generator=g), dim=1)
    noisy = torch.zeros(n, dtype=torch.bool)
    noisy[torch.randperm(n, generator=g)[:round(FLIP * n)]] = True
    given = y.clone()
    given[noisy] = (y[noisy] + torch.randint(1, C, (int(noisy.sum()),), generator=g)) % C
    return {"img": img, "text": dirs, "y": y, "given": given, "noisy": noisy, "logits": SCALE * img @ dirs.t()}


def view_of(d: dict[str, torch.Tensor], epoch: int = 0, epochs: int = 20, seed: int = 1,
            learners: int = 1, is_noisy: bool = True) -> EpochView:
    return EpochView(epoch=epoch, epochs=epochs, logits=d["logits"].expand(learners, -1, -1).clone(),
                     image_features=d["img"], text_features=d["text"].expand(learners, -1, -1).clone(),
                     given=d["given"], logit_scale=SCALE, gen=torch.Generator().manual_seed(seed),
                     is_noisy=d["noisy"].numpy() if is_noisy else None)


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting half."""
    pos, neg = score[positive], score[~positive]
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def _log_softmax64(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


# ----------------------------------------------------------------------------------------------
# registry, defaults, option checks


def test_methods_register_with_summary_paper_and_learners():
    assert {"nlprompt", "joapr", "coteaching"} <= set(METHODS)
    for name, learners in (("nlprompt", 1), ("joapr", 1), ("coteaching", 2)):
        cls = METHODS[name]
        assert cls.name == name and cls.summary and cls.paper and cls.learners == learners
        assert "\n" not in cls.summary


def test_defaults_list_every_hyperparameter():
    assert NLPrompt.defaults() == {"reg": 0.01, "cost": "prob"}  # the authors' regime (test_methods_details)
    assert JoAPR.defaults() == {"warmup": 1, "warmup_penalty": 0.5, "mix_alpha": 0.001, "temperature": 0.5,
                                "prior_penalty": 0.5}
    assert CoTeaching.defaults() == {"forget_rate": 0.2, "t_k": 10}


@pytest.mark.parametrize("name,bad", [("nlprompt", "regg"), ("joapr", "warmup_epochs"),
                                      ("coteaching", "tau")])
def test_unknown_hyperparameters_are_refused(name, bad):
    with pytest.raises(ConfigError, match=bad) as err:
        check_method(name, {bad: 1})
    for known in METHODS[name].defaults():
        assert known in str(err.value)
    check_method(name, dict(METHODS[name].defaults()))  # the known ones pass


@pytest.mark.parametrize("name,options", [("nlprompt", {"reg": 0}), ("nlprompt", {"cost": "l2"}),
                                          ("joapr", {"warmup": -1}), ("joapr", {"warmup": 1.5}),
                                          ("joapr", {"temperature": 0}), ("joapr", {"mix_alpha": -1}),
                                          ("coteaching", {"forget_rate": 1.0}), ("coteaching", {"t_k": 2.5}),
                                          ("coteaching", {"t_k": True})])
def test_invalid_values_are_refused(name, options):
    with pytest.raises(ConfigError, match=next(iter(options))):
        get_method(name, get_loss("ce"), C, N, **options)


# ----------------------------------------------------------------------------------------------
# NLPrompt


def test_nlprompt_ot_finds_the_planted_flips():
    d = synthetic()
    m = NLPrompt(get_loss("ce"), C, N)
    m.begin_epoch(view_of(d))
    flagged, truth = m.noisy.numpy(), d["noisy"].numpy()
    recall = (flagged & truth).sum() / truth.sum()
    fpr = (flagged & ~truth).sum() / (~truth).sum()
    assert recall >= 0.9 and fpr <= 0.1, (recall, fpr)  # measured: recall 1.0, fpr 0.0
    # the pseudo-labels are the argmax of the plan rows, and recover the true classes here
    assert (m.pseudo == d["y"]).float().mean() >= 0.95
    log = m.epoch_log()
    assert log["noisy_share"] == pytest.approx(flagged.mean())
    assert log["noisy_recall"] == pytest.approx(recall)
    assert log["noisy_precision"] == pytest.approx((flagged & truth).sum() / flagged.sum())
    assert log["ot_error"] < 1e-3
    # without the truth, no precision/recall (and the split is the same: it never looks at it)
    m2 = NLPrompt(get_loss("ce"), C, N)
    m2.begin_epoch(view_of(d, is_noisy=False))
    assert "noisy_recall" not in m2.epoch_log() and torch.equal(m2.noisy, m.noisy)


def test_nlprompt_plan_has_uniform_marginals_and_the_code_cost_agrees():
    d = synthetic()  # every image nearest its own class: the plan converges
    plan, pseudo, err = prompt_ot(d["img"], d["text"], SCALE)  # the default: cost "prob", reg 0.01
    assert plan.dtype == torch.float64 and plan.shape == (N, C) and err < 1e-5
    assert torch.allclose(plan.sum(1), torch.full((N,), 1 / N, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(plan.sum(0), torch.full((C,), 1 / C, dtype=torch.float64), atol=1e-5)
    assert torch.equal(pseudo, plan.argmax(1))
    # harder: some images nearer another class; 1000 Sinkhorn iterations (the authors' cap) leave the
    # class marginals a little off (reported as ot_error: measured 1.5e-2 for logp, 1.1e-2 for prob: this
    # toy's logits, 100 * cosines with gaps of ~0.4, are far more confident than CLIP's), and both costs
    # still find the flips
    d = synthetic(spread=0.3)
    _, pseudo, err = prompt_ot(d["img"], d["text"], SCALE, reg=0.01, cost="logp")
    _, pseudo_prob, err_prob = prompt_ot(d["img"], d["text"], SCALE, reg=0.01, cost="prob")
    assert 0 < err < 0.1 and 0 < err_prob < 0.1
    assert (pseudo == pseudo_prob).float().mean() >= 0.95
    for p in (pseudo, pseudo_prob):
        flagged, truth = (p != d["given"]).numpy(), d["noisy"].numpy()
        assert (flagged & truth).sum() / truth.sum() >= 0.9  # measured: 0.975 for both
        assert (flagged & ~truth).sum() / (~truth).sum() <= 0.1  # measured: 0.075 for both


def test_nlprompt_is_deterministic():
    d = synthetic(spread=0.3)
    a, b = NLPrompt(get_loss("ce"), C, N), NLPrompt(get_loss("ce"), C, N)
    with pytest.warns(SinkhornWarning):  # this toy stops at 1.1e-2 (see above): each run warns once
        a.begin_epoch(view_of(d, seed=1))
    with pytest.warns(SinkhornWarning):
        b.begin_epoch(view_of(d, seed=2))  # no randomness: the generator does not matter
    assert torch.equal(a.pseudo, b.pseudo) and torch.equal(a.noisy, b.noisy)
    assert a.epoch_log() == b.epoch_log()


def test_nlprompt_loss_is_ce_on_clean_plus_mae_on_the_rest():
    d = synthetic()
    m = NLPrompt(get_loss("ce"), C, N)
    m.begin_epoch(view_of(d))
    g = torch.Generator().manual_seed(3)
    idx = torch.randperm(N, generator=g)[:64]
    z = (3.0 * torch.randn(1, 64, C, generator=g)).requires_grad_()
    y = d["given"][idx]
    loss = m.loss(z, idx, y)
    zz, yy, noisy = z.detach()[0].double().numpy(), y.numpy(), m.noisy[idx].numpy()
    logp = _log_softmax64(zz)[np.arange(64), yy]
    expected = np.where(noisy, 1.0 - np.exp(logp), -logp).mean()
    assert 0 < noisy.sum() < 64
    assert loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-6)
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="begin_epoch"):
        NLPrompt(get_loss("ce"), C, N).loss(z, idx, y)


# ----------------------------------------------------------------------------------------------
# JoAPR


def test_joapr_partition_separates_clean_from_flipped():
    d = synthetic()  # the model predicts the true classes: flipped samples have a large loss
    part = partition(d["logits"], d["given"], seed=0)
    truth = d["noisy"].numpy()
    score = part["prob_clean"]
    assert auroc(score, ~truth) >= 0.9  # measured: 1.0
    flagged = ~part["clean"]
    precision = (flagged & truth).sum() / flagged.sum()
    recall = (flagged & truth).sum() / truth.sum()
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)  # measured: 1.0, 1.0
    assert 0 < part["prob_threshold"] < 1 and 0 < part["loss_threshold"] < 1
    assert part["prob_threshold"] == pytest.approx(np.mean(score <= 0.5))
    # same seed, same fit
    again = partition(d["logits"], d["given"], seed=0)
    assert np.array_equal(again["prob_clean"], score) and np.array_equal(again["clean"], part["clean"])


def test_joapr_gaussian_crossing():
    assert gaussian_crossing(0.2, 0.01, 0.8, 0.01) == pytest.approx(0.5)
    for mc, vc, mn, vn in ((0.1, 0.005, 0.7, 0.04), (0.2, 0.05, 0.6, 0.002)):
        x = gaussian_crossing(mc, vc, mn, vn)
        dens = [math.exp(-(x - m) ** 2 / (2 * v)) / math.sqrt(v) for m, v in ((mc, vc), (mn, vn))]
        assert dens[0] == pytest.approx(dens[1], rel=1e-9)
        assert mc < x < mn


def test_joapr_refurbished_targets_are_distributions():
    d = synthetic()
    m = JoAPR(get_loss("ce"), C, N)
    for epoch in (1, 2):  # first post-warm-up epoch (w) and later ones (w * p_y)
        m.begin_epoch(view_of(d, epoch=epoch))
        t = m.targets
        assert t.shape == (N, C) and torch.isfinite(t).all() and (t >= 0).all()
        assert torch.allclose(t.sum(1), torch.ones(N), atol=1e-5)
        # flagged samples (all flips here) lean to the model's class, not their given label
        flagged = ~m.clean
        assert torch.equal(flagged, d["noisy"])
        assert (t[flagged].argmax(1) == d["y"][flagged]).all()
        assert (t[~flagged].argmax(1) == d["given"][~flagged]).all()
        log = m.epoch_log()
        assert log["clean_share"] == pytest.approx(1 - FLIP)
        assert log["noisy_precision"] == 1.0 and log["noisy_recall"] == 1.0
    assert torch.allclose(sharpen(torch.tensor([[0.6, 0.4]]), 0.5), torch.tensor([[0.36 / 0.52, 0.16 / 0.52]]))


def test_joapr_mixup_draws_are_deterministic():
    lam1, perm1 = mix_draw(32, 4.0, torch.Generator().manual_seed(5))
    lam2, perm2 = mix_draw(32, 4.0, torch.Generator().manual_seed(5))
    lam3, perm3 = mix_draw(32, 4.0, torch.Generator().manual_seed(6))
    assert lam1 == lam2 and torch.equal(perm1, perm2)
    assert (lam1, perm1.tolist()) != (lam3, perm3.tolist())
    assert 0.5 <= lam1 <= 1 and sorted(perm1.tolist()) == list(range(32))
    lam, _ = mix_draw(32, 0.001, torch.Generator().manual_seed(5))  # the default: lambda ~ 1
    assert lam > 0.999


def test_joapr_step_mixes_features_and_uses_soft_targets():
    d = synthetic()
    m = JoAPR(get_loss("ce"), C, N, mix_alpha=4.0)
    m.begin_epoch(view_of(d, epoch=1))
    idx = torch.arange(40, 72)
    feats = d["img"][idx]
    mixed = m.inputs(feats, idx, torch.Generator().manual_seed(9))
    lam, perm = mix_draw(32, 4.0, torch.Generator().manual_seed(9))
    expected = F.normalize(lam * feats + (1 - lam) * feats[perm], dim=1)
    assert lam < 0.99 and torch.allclose(mixed, expected, atol=1e-6)
    assert torch.allclose(mixed.norm(dim=1), torch.ones(32), atol=1e-6)
    z = (SCALE * mixed @ d["text"].t()).unsqueeze(0).requires_grad_()
    loss = m.loss(z, idx, d["given"][idx])
    t = m.targets[idx].double()
    target = lam * t + (1 - lam) * t[perm]
    logp = torch.log_softmax(z.detach()[0].double(), 1)
    mean_pred = logp.exp().mean(0)
    prior = torch.full((C,), 1 / C, dtype=torch.float64)
    ref = -(target * logp).sum(1).mean() + 0.5 * (prior * torch.log(prior / mean_pred)).sum()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    with pytest.raises(RuntimeError, match="did not mix"):
        m.loss(z, torch.arange(32), d["given"][:32])


def test_joapr_warmup_is_the_plain_loss():
    d = synthetic()
    g = torch.Generator().manual_seed(4)
    z = 3.0 * torch.randn(1, 50, C, generator=g)
    idx, y = torch.arange(50), d["given"][:50]
    plain = JoAPR(get_loss("ce"), C, N, warmup=2, warmup_penalty=0.0)
    for epoch in (0, 1):
        plain.begin_epoch(view_of(d, epoch=epoch))
        assert plain.epoch_log() == {"warmup": 1.0}
        feats = d["img"][:50]
        assert plain.inputs(feats, idx, torch.Generator().manual_seed(0)) is feats  # no mixup
        assert plain.loss(z, idx, y).item() == pytest.approx(F.cross_entropy(z[0], y).item(), rel=1e-6)
    default = JoAPR(get_loss("ce"), C, N)  # the authors' confidence penalty, 0.5 * mean sum p log p
    default.begin_epoch(view_of(d, epoch=0))
    p = torch.softmax(z[0].double(), 1)
    ref = F.cross_entropy(z[0].double(), y) + 0.5 * (p * p.log()).sum(1).mean()
    assert default.loss(z, idx, y).item() == pytest.approx(ref.item(), rel=1e-6)
    default.begin_epoch(view_of(d, epoch=1))  # warm-up over: a partition is made
    assert "clean_share" in default.epoch_log()


# ----------------------------------------------------------------------------------------------
# Co-teaching


def test_coteaching_schedule_and_kept_share():
    m = CoTeaching(get_loss("ce"), C, N, forget_rate=0.2, t_k=10)
    d = synthetic()
    g = torch.Generator().manual_seed(2)
    for epoch, forget in ((0, 0.0), (5, 0.1), (10, 0.2), (11, 0.2), (150, 0.2)):
        assert forget_rate_at(epoch, 0.2, 10) == pytest.approx(forget)
        m.begin_epoch(view_of(d, epoch=epoch, epochs=200, learners=2))
        for s in range(3):
            idx = torch.arange(20 * s, 20 * s + 20)
            m.loss(torch.randn(2, 20, C, generator=g), idx, d["given"][idx])
        log = m.epoch_log()
        assert log["forget_rate"] == pytest.approx(forget)
        assert log["keep_rate"] == pytest.approx(1 - forget)
        assert log["kept_share"] == pytest.approx(1 - forget)  # 20, 18, 16 of 20: exact
    assert forget_rate_at(3, 0.4, 0) == 0.4
    assert keep_count(0.8, 32) == 26 and keep_count(0.01, 5) == 1 and keep_count(1.0, 7) == 7


def test_coteaching_each_learner_trains_on_the_others_selection():
    ce = get_loss("ce")
    m = CoTeaching(ce, C, N, forget_rate=0.1, t_k=0)  # keep 9 of 10
    m.begin_epoch(view_of(synthetic(), epoch=0, learners=2))
    y = torch.zeros(10, dtype=torch.long)
    z = torch.zeros(2, 10, C)
    z[:, :, 0] = torch.linspace(5.0, 4.0, 10)  # both learners fit the label, less and less
    z[0, 3, 0] = -5.0  # learner 0 finds sample 3 the hardest: it drops it, learner 1 keeps it
    z[1, 7, 0] = -5.0  # learner 1 drops sample 7, learner 0 keeps it
    z.requires_grad_()
    keep0, keep1 = m.selections(z.detach(), y)
    assert 3 not in keep0.tolist() and 3 in keep1.tolist()
    assert 7 not in keep1.tolist() and 7 in keep0.tolist()
    loss = m.loss(z, torch.arange(10), y)
    loss.backward()
    grad = z.grad.abs().sum(-1)
    assert grad[0, 3] > 0 and grad[1, 3] == 0  # chosen by learner 1 only: trains learner 0 only
    assert grad[1, 7] > 0 and grad[0, 7] == 0  # chosen by learner 0 only: trains learner 1 only
    expected = ce(z.detach()[0][keep1], y[keep1]) + ce(z.detach()[1][keep0], y[keep0])
    assert loss.item() == pytest.approx(expected.item())


def test_coteaching_without_forgetting_is_two_plain_losses_and_measures_precision():
    d = synthetic()
    for name in ("ce", "dspt"):
        loss_fn = get_loss(name)
        m = CoTeaching(loss_fn, C, N, forget_rate=0.0)
        m.begin_epoch(view_of(d, epoch=30, learners=2))
        z = torch.randn(2, 64, C, generator=torch.Generator().manual_seed(1))
        idx = torch.arange(64)
        y = d["given"][idx]
        assert m.loss(z, idx, y).item() == pytest.approx((loss_fn(z[0], y) + loss_fn(z[1], y)).item(), rel=1e-6)
    # the model's logits single out the flips: at the noise rate every kept label is clean
    m = CoTeaching(get_loss("ce"), C, N, forget_rate=FLIP, t_k=0)
    m.begin_epoch(view_of(d, epoch=0, learners=2))
    for s in range(N // 40):
        idx = torch.arange(40 * s, 40 * s + 40)
        m.loss(d["logits"][idx].expand(2, -1, -1), idx, d["given"][idx])
    log = m.epoch_log()
    assert log["kept_share"] == pytest.approx(1 - FLIP, abs=0.02)
    assert log["label_precision"] >= 0.95  # measured: 0.975 (some batches hold more than 30 % flips)
    with pytest.raises(ValueError, match="2 learners"):
        m.loss(torch.zeros(1, 4, C), torch.arange(4), d["given"][:4])
