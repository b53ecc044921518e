"""The policy-gradient-driven noise mask (PGNM) and its pre-train / fine-tune / probe task."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffkit.harness import run_method, validate_card
from diffkit.harness.noise_mask import (MaskPolicy, NoiseMaskPretraining, SmallCNN, gaussian_blur, pgnm_loss,
                                        sample_mask)
from diffkit.harness.tasks import noise_mask as task


ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 16, 16)


def _batch(seed=0, n=8):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 256, generator=gen), torch.randint(0, 7, (n,), generator=gen)


def test_official_loss_pinned_on_a_fixed_seed():
    torch.manual_seed(0)
    policy, classifier = MaskPolicy(SHAPE, grid=8), SmallCNN(SHAPE, 7)
    x, y = _batch()
    base_a, base_b = torch.rand(1, 64), torch.rand(1, 64)
    alpha, beta, _, _ = policy(x.view(-1, *SHAPE), base_a, base_b)
    cells, dist, mask = sample_mask(alpha, beta, (16, 16), 3, 0.5)
    ce = F.cross_entropy(classifier((x.view(-1, *SHAPE) * mask).flatten(1)), y)
    logp = dist.log_prob(cells)
    # train_one_epoch.py: torch.mean(torch.log(torch.sum(logp.exp(), 1)) * criterion(output, target))
    official = torch.mean(torch.log(torch.sum(logp.exp(), 1)) * ce)
    ours = pgnm_loss(logp, ce)
    torch.testing.assert_close(ours, official)
    assert ours.item() == pytest.approx(official.item(), rel=1e-6)
    # the same seed gives the same number (sampling, policy and classifier are all seeded)
    torch.manual_seed(0)
    policy2, classifier2 = MaskPolicy(SHAPE, grid=8), SmallCNN(SHAPE, 7)
    a2, b2 = torch.rand(1, 64), torch.rand(1, 64)
    alpha2, beta2, _, _ = policy2(x.view(-1, *SHAPE), a2, b2)
    cells2, dist2, mask2 = sample_mask(alpha2, beta2, (16, 16), 3, 0.5)
    ce2 = F.cross_entropy(classifier2((x.view(-1, *SHAPE) * mask2).flatten(1)), y)
    assert pgnm_loss(dist2.log_prob(cells2), ce2).item() == ours.item()


def test_mask_carries_no_gradient_and_the_detached_variant_only_rescales_the_classifier():
    torch.manual_seed(1)
    policy, classifier = MaskPolicy(SHAPE, grid=4), SmallCNN(SHAPE, 7)
    x, y = _batch(1)
    alpha, beta, _, _ = policy(x.view(-1, *SHAPE), torch.rand(1, 16), torch.rand(1, 16))
    cells, dist, mask = sample_mask(alpha, beta, (16, 16), 3, 0.5)
    assert not cells.requires_grad and not mask.requires_grad
    ce = F.cross_entropy(classifier((x.view(-1, *SHAPE) * mask).flatten(1)), y)
    # the cross-entropy does not reach the policy: only the log-density does
    assert all(g is None for g in torch.autograd.grad(ce, list(policy.parameters()), allow_unused=True, retain_graph=True))
    logp = dist.log_prob(cells)
    params = list(policy.parameters()) + list(classifier.parameters())
    official = torch.autograd.grad(pgnm_loss(logp, ce), params, retain_graph=True)
    detached = torch.autograd.grad(pgnm_loss(logp, ce, detached=True), params, retain_graph=True)
    plain = torch.autograd.grad(ce, list(classifier.parameters()), retain_graph=True)
    lse = torch.logsumexp(logp, 1).mean().detach()
    n_policy = len(list(policy.parameters()))
    for a, b in zip(official[:n_policy], detached[:n_policy]):  # the policy's gradient is the same in both
        torch.testing.assert_close(a, b)
    for a, b, c in zip(official[n_policy:], detached[n_policy:], plain):
        torch.testing.assert_close(a, lse * c)  # official: the classifier's gradient scaled by the log-sum-exp
        torch.testing.assert_close(b, c)  # detached: the plain cross-entropy gradient


def test_gaussian_blur_is_a_normalised_separable_gaussian_with_reflect_padding():
    image = torch.rand(2, 1, 6, 7, generator=torch.Generator().manual_seed(0))
    sigma, k = 0.8, 5
    offsets = torch.arange(k) - k // 2
    g = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel2d = torch.outer(g, g) / torch.outer(g, g).sum()
    expected = F.conv2d(F.pad(image, (2, 2, 2, 2), mode="reflect"), kernel2d[None, None])
    torch.testing.assert_close(gaussian_blur(image, k, sigma), expected)
    with pytest.raises(ValueError, match="odd"):
        gaussian_blur(image, 4, 1.0)


def test_finetune_and_evaluation_see_clean_inputs(monkeypatch):
    card = json.loads((ROOT / "cards" / "pgnm.json").read_text())
    card["budget"].update(epochs=1, finetune_epochs=1, warmup_epochs=1)
    card["data"]["mnist_count"] = 200
    card = validate_card(card)
    seen = []
    original_finetune, original_accuracy = task.finetune, task.accuracy

    def spy(model):
        model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))

    def finetune(model, data, budget, seed, accelerator, progress):
        seen.clear()
        spy(model)
        clean = data.x_train
        result = original_finetune(model, data, budget, seed, accelerator, progress)
        # every training batch of the fine-tuning is a set of rows of the clean images
        rows = {tuple(r.tolist()) for r in clean}
        assert seen and all(tuple(r.tolist()) in rows for batch in seen for r in batch)
        seen.clear()
        return result

    def accuracy(model, x, y, accelerator, batch=2048):
        seen.clear()
        result = original_accuracy(model, x, y, accelerator, batch)
        if seen:  # after the fine-tune the spy is installed: evaluation inputs are the clean test images
            assert torch.equal(torch.cat(seen), x)
        return result

    monkeypatch.setattr(task, "finetune", finetune)
    monkeypatch.setattr(task, "accuracy", accuracy)
    record = run_method(card, "pgnm", 0, progress=False)
    assert {"test_accuracy", "probe_accuracy", "mean_log_density"} <= set(record["metrics"])


def test_pretraining_perturbs_only_its_own_steps_and_refuses_unknown_kinds():
    x, _ = _batch()
    torch.manual_seed(0)
    for kind in NoiseMaskPretraining.KINDS:
        algorithm = NoiseMaskPretraining(kind, SHAPE, grid=8)
        perturbed, logp = algorithm.masked_input(x)
        assert perturbed.shape == x.shape
        assert torch.equal(perturbed, x) == (kind == "none")
        assert (logp is not None) == kind.startswith("pgnm")
    with pytest.raises(ValueError, match="kind"):
        NoiseMaskPretraining("dropout", SHAPE)
    card = json.loads((ROOT / "cards" / "pgnm.json").read_text())
    card["methods"]["bad"] = {"algorithm": {"kind": "cutout"}}
    with pytest.raises(ValueError, match="kind must be one of"):
        validate_card(card)
