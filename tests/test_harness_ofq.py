"""OFQ's confidence-guided annealing and query-key reparameterisation: the freezing rule against hand-placed weights
(including the reference's tensor-wide code range), bit-identical frozen weights under Adam, the annealing window,
QKR and separate q/k logits against hand computations, and the tiny ViT against nn.MultiheadAttention."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffkit.harness.cards import load_card, validate_card
from diffkit.harness.data import HarnessData
from diffkit.harness.experiment import build_model, run_method
from diffkit.harness.loop import train
from diffkit.harness.models import mlp
from diffkit.harness.ofq import (ConfidenceGuidedAnnealing, FusedQueryKey, StatsQAttention, TinyViT, cga_frozen_mask,
                                 statsq_prerounding)
from diffkit.harness.registry import ALGORITHMS, MODELS, CrossEntropy
from diffkit.harness.statsq import LevelFlips, StatsQLinear, statsq, statsq_factory

R = 0.005  # the reference's boundaryRange

# 2 bits: n = 2, codes -2..1, b = u - 1/2 with u = W / s * n, so the boundaries b = i + 1/2 sit at u = -1, 0, 1.
# Each row has mean |u| = 1, which makes s = 2 mean|W| equal the scale the row was built with.
U = torch.tensor([
    # |b - boundary|: .003, .004, .002 (train), .5, .01, .02 (frozen), clamped at the top edge b ~ 1.5 (frozen: the
    # edge is no boundary), .469 (frozen)
    [1.003, -0.996, 0.002, 0.5, 1.01, -0.02, 3.0, 1.469],
    # clamped at the bottom edge b = -2.5 (frozen), .004, .0049 (train), .3, .1, .3, .2, .1089 (frozen)
    [-3.0, -1.004, 0.0049, -0.3, 0.9, 0.7, 1.2, 0.8911],
])
U_FROZEN = torch.tensor([[False, False, False, True, True, True, True, True],
                         [True, False, False, True, True, True, True, True]])


def _weight(u, scales):
    return u * torch.tensor(scales).unsqueeze(1) / 2  # W = s u / n


def test_statsq_prerounding_matches_the_construction():
    w = _weight(U, [0.3, 1.7])
    b, codes = statsq_prerounding(w, 2)
    expected = U.clamp(-2, 2 * (1 - 1e-6)) - 0.5
    torch.testing.assert_close(b, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(codes, torch.round(expected))


def test_cga_freezes_exactly_the_confident_weights():
    assert torch.equal(cga_frozen_mask(_weight(U, [0.3, 1.7]), 2, R), U_FROZEN)
    # a wider range catches the .01 and .02 weights too
    wider = U_FROZEN.clone()
    wider[0, 4:6] = False
    assert torch.equal(cga_frozen_mask(_weight(U, [0.3, 1.7]), 2, 0.03), wider)


def test_cga_boundaries_span_the_tensors_code_range_as_in_the_reference():
    # the largest code in the whole tensor is 0, so the boundary 0 | 1 (b = 1/2) is not looked at: the weight at
    # b = .498 is frozen although it is .002 from it; the one at b = -1.498 (.002 from the -2 | -1 boundary) trains
    u = torch.tensor([[0.998, -0.998, -1.5, -0.504]])
    assert torch.round(statsq_prerounding(_weight(u, [1.0]), 2)[0]).tolist() == [[0.0, -1.0, -2.0, -1.0]]
    assert cga_frozen_mask(_weight(u, [1.0]), 2, R).tolist() == [[True, False, True, True]]


def _adam_setup(epochs=2, freeze_epochs=1):
    layer = StatsQLinear(8, 2, bits=2)
    w0 = _weight(U, [0.3, 1.7])
    with torch.no_grad():
        layer.weight.copy_(w0)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3, weight_decay=0.1)
    state = SimpleNamespace(unwrapped_model=nn.Sequential(layer), optimizer=optimizer, epochs=epochs, epoch=0, logs={})
    cga = ConfidenceGuidedAnnealing(freeze_epochs=freeze_epochs, boundary_range=R)
    cga.on_train_start(state)
    return layer, w0, optimizer, state, cga


def _step(layer, optimizer, state, cga, seed=0):
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(seed))
    optimizer.zero_grad()
    (layer(x) * torch.arange(1.0, 3.0)).sum().backward()
    cga.after_backward(state)
    grad = layer.weight.grad.clone()
    optimizer.step()
    return grad


def test_frozen_weights_are_bit_identical_after_an_adam_step_and_unconfident_ones_move():
    layer, w0, optimizer, state, cga = _adam_setup()
    _step(layer, optimizer, state, cga)  # epoch 0 of 2: no annealing, every weight moves
    assert (layer.weight.detach() != w0).all()
    with torch.no_grad():  # back to the constructed weights, keeping Adam's (now non-zero) moments
        layer.weight.copy_(w0)
    state.epoch = 1
    grad = _step(layer, optimizer, state, cga, seed=1)
    w = layer.weight.detach()
    assert (grad[U_FROZEN] == 0).all() and (grad[~U_FROZEN] != 0).all()
    assert torch.equal(w[U_FROZEN], w0[U_FROZEN])  # momentum and weight decay did not move them
    assert (w[~U_FROZEN] != w0[~U_FROZEN]).all()
    cga.on_train_end(state)
    assert state.logs["cga_frozen_fraction"] == pytest.approx(U_FROZEN.float().mean().item())
    assert state.logs["curves"]["cga_frozen_fraction"] == [[2, pytest.approx(11 / 16)]]


def test_annealing_covers_exactly_the_last_freeze_epochs():
    layer, w0, optimizer, state, cga = _adam_setup(epochs=5, freeze_epochs=2)
    masked = []
    for epoch in range(5):
        state.epoch = epoch
        masked.append(bool((_step(layer, optimizer, state, cga, seed=epoch) == 0).any()))
    assert masked == [False, False, False, True, True]
    cga.on_train_end(state)
    assert [e for e, _ in state.logs["curves"]["cga_frozen_fraction"]] == [4, 5]


def test_cga_in_the_training_loop_restores_every_frozen_weight():
    g = torch.Generator().manual_seed(0)
    data = HarnessData(torch.rand(64, 12, generator=g), torch.randint(0, 3, (64,), generator=g),
                       torch.rand(8, 12, generator=g), torch.randint(0, 3, (8,), generator=g), num_classes=3)
    model = mlp(12, 3, [16], linear=statsq_factory(2))
    cga = ConfidenceGuidedAnnealing(freeze_epochs=1)
    layer = model[0]

    class Probe:  # after CGA's after_backward: the zeroed entries must come back unchanged after the step
        def __init__(self):
            self.pending, self.checked = None, 0

        def after_backward(self, state):
            if cga.annealing(state):
                self.pending = (layer.weight.grad == 0, layer.weight.detach().clone())

        def on_step_start(self, state):
            if self.pending is not None:
                frozen, before = self.pending
                assert torch.equal(layer.weight.detach()[frozen], before[frozen])
                self.checked, self.pending = self.checked + 1, None

        on_epoch_end = on_step_start

    probe = Probe()
    state = train(model, data, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2), criterion=CrossEntropy(),
                  epochs=3, batch_size=16, seed=0, algorithm=cga, hooks=[cga, probe], progress=False)
    assert probe.checked == 4  # the last epoch's four steps
    assert 0.5 < state.logs["cga_frozen_fraction"] <= 1.0


def test_cga_refuses_bad_arguments():
    with pytest.raises(ValueError, match="boundary_range"):
        ConfidenceGuidedAnnealing(boundary_range=0.5)
    with pytest.raises(ValueError, match="freeze_epochs must be a positive int"):
        ConfidenceGuidedAnnealing(freeze_epochs=0)
    with pytest.raises(ValueError, match="freeze_epochs must be < the 3 training epochs"):
        _adam_setup(epochs=3, freeze_epochs=3)
    state = SimpleNamespace(unwrapped_model=nn.Linear(2, 2), optimizer=None, epochs=4)
    with pytest.raises(ValueError, match="StatsQ linear layers"):
        ConfidenceGuidedAnnealing(freeze_epochs=1).on_train_start(state)
    with pytest.raises(ValueError, match="algorithm 'cga' has no parameter 'boundaryRange'"):
        ALGORITHMS.check("cga", {"boundaryRange": 0.005})


# --- QKR ---------------------------------------------------------------------------------------------------------

def _heads(w, heads):  # (dim, dim) projection -> per-head (heads, d, dim)
    return w.view(heads, -1, w.shape[1])


def test_qkr_logits_are_x_q_of_the_fused_matrix_x_transposed():
    attn = StatsQAttention(8, heads=2, bits=2, qkr=True)
    x = torch.randn(3, 5, 8)
    wq, wk = _heads(attn.qk.q.weight.detach(), 2), _heads(attn.qk.k.weight.detach(), 2)
    for h in range(2):
        fused = wq[h].T @ wk[h]  # (8, 8) = W_q^h^T W_k^h
        expected = x @ statsq(fused, 2) @ x.transpose(1, 2) / math.sqrt(4)
        torch.testing.assert_close(attn.qk(x)[:, h].detach(), expected, rtol=1e-5, atol=1e-5)
    # the codes are the fused matrix's, heads stacked by rows; the gradient reaches W_q and W_k (straight through)
    stacked = torch.cat([wq[h].T @ wk[h] for h in range(2)])
    torch.testing.assert_close(attn.qk.integer_weight(), torch.round(statsq_prerounding(stacked, 2)[0]))
    attn(x).square().sum().backward()
    assert attn.qk.q.weight.grad.abs().sum() > 0 and attn.qk.k.weight.grad.abs().sum() > 0
    assert type(attn.qk.q) is nn.Linear  # W_q, W_k stay full-precision parameters


def test_separate_qk_quantises_w_q_and_w_k_each_on_its_own():
    attn = StatsQAttention(8, heads=2, bits=2, qkr=False)
    assert all(isinstance(m, StatsQLinear) for m in (attn.qk.q, attn.qk.k, attn.v, attn.proj))
    x = torch.randn(3, 5, 8)
    q = (x @ statsq(attn.qk.q.weight.detach(), 2).T).view(3, 5, 2, 4).transpose(1, 2)
    k = (x @ statsq(attn.qk.k.weight.detach(), 2).T).view(3, 5, 2, 4).transpose(1, 2)
    logits = q @ k.transpose(-2, -1) / 2
    torch.testing.assert_close(attn.qk(x).detach(), logits, rtol=1e-5, atol=1e-5)
    v = F.linear(x, statsq(attn.v.weight.detach(), 2), attn.v.bias.detach()).view(3, 5, 2, 4).transpose(1, 2)
    mixed = (logits.softmax(-1) @ v).transpose(1, 2).reshape(3, 5, 8)
    expected = F.linear(mixed, statsq(attn.proj.weight.detach(), 2), attn.proj.bias.detach())
    torch.testing.assert_close(attn(x).detach(), expected, rtol=1e-5, atol=1e-5)


def test_qkr_at_8_bits_leaves_only_statsqs_clip():
    fp = StatsQAttention(32, heads=2)
    x = torch.randn(4, 17, 32)
    errors = {}
    for bits in (8, 2):
        qkr = StatsQAttention(32, heads=2, bits=bits, qkr=True)
        qkr.load_state_dict(fp.state_dict())  # same parameter names: QKR reparameterises, it adds nothing
        errors[bits] = ((qkr(x) - fp(x)).norm() / fp(x).norm()).item()
    # 2^8 levels: the rounding error is gone; what is left is StatsQ's clip of the fused matrix at 2 mean|W| per row
    fused = fp.qk.q.weight.detach().view(2, 16, 32).transpose(1, 2) @ fp.qk.k.weight.detach().view(2, 16, 32)
    s = 2 * fused.abs().mean(dim=2, keepdim=True)
    clipped = torch.einsum("bnc,hcd,bmd->bhnm", x, torch.maximum(torch.minimum(fused, s), -s), x) / 4
    qkr = StatsQAttention(32, heads=2, bits=8, qkr=True)
    qkr.load_state_dict(fp.state_dict())
    logits = qkr.qk(x).detach()
    assert ((logits - clipped).norm() / clipped.norm()).item() < 0.01
    assert errors[8] < 0.1 and errors[2] > 2 * errors[8]


def test_qkr_needs_bits_and_attention_refuses_bad_shapes():
    with pytest.raises(ValueError, match="QKR .* needs bits"):
        FusedQueryKey(8, 2, None)
    with pytest.raises(ValueError, match="heads dividing dim"):
        StatsQAttention(10, heads=3)
    with pytest.raises(ValueError, match="bits"):
        StatsQAttention(8, heads=2, bits=9)
    with pytest.raises(ValueError, match="square"):
        TinyViT(60, 10)


# --- the tiny ViT ------------------------------------------------------------------------------------------------

def test_full_precision_vit_equals_a_hand_computation_with_multihead_attention():
    vit = TinyViT(64, 10, dim=16, depth=2, heads=2, mlp_ratio=2, patch=2).eval()
    x = torch.rand(3, 64)
    # patch embedding = a stride-2 convolution on the 8x8 image
    conv_w = vit.embed.weight.detach().view(16, 1, 2, 2)
    t = F.conv2d(x.view(3, 1, 8, 8), conv_w, vit.embed.bias.detach(), stride=2).flatten(2).transpose(1, 2)
    t = torch.cat([vit.cls_token.detach().expand(3, -1, -1), t], dim=1) + vit.pos_embed.detach()
    for block in vit.blocks:
        a = block.attn
        mha = nn.MultiheadAttention(16, 2, batch_first=True)
        with torch.no_grad():
            mha.in_proj_weight.copy_(torch.cat([a.qk.q.weight, a.qk.k.weight, a.v.weight]))
            mha.in_proj_bias.copy_(torch.cat([torch.zeros(32), a.v.bias]))
            mha.out_proj.weight.copy_(a.proj.weight)
            mha.out_proj.bias.copy_(a.proj.bias)
        h = F.layer_norm(t, (16,))  # LayerNorm's affine starts at (1, 0)
        t = t + mha(h, h, h, need_weights=False)[0]
        fc1, fc2 = block.mlp[0], block.mlp[2]
        t = t + F.linear(F.gelu(F.linear(F.layer_norm(t, (16,)), fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
    expected = vit.head(F.layer_norm(t, (16,))[:, 0])
    torch.testing.assert_close(vit(x).detach(), expected.detach(), rtol=1e-5, atol=1e-5)


def test_card_vit_quantises_the_blocks_and_keeps_embedding_and_head_full_precision():
    data = SimpleNamespace(num_features=64, num_classes=10)
    model, hooks = build_model({"model": {"name": "vit", "bits": 2, "qkr": True}}, data, epochs=1)
    assert sum(isinstance(m, StatsQLinear) for m in model.modules()) == 2 * 4  # v, proj, fc1, fc2 per block
    assert sum(isinstance(m, FusedQueryKey) for m in model.modules()) == 2
    assert type(model.embed) is nn.Linear and type(model.head) is nn.Linear
    assert any(isinstance(h, LevelFlips) for h in hooks)
    assert build_model({"model": {"name": "vit"}}, data, epochs=1)[1] == []
    with pytest.raises(ValueError, match="model 'vit' has no parameter 'bit'"):
        MODELS.check("vit", {"bit": 2})


def test_ofq_cards_validate_and_a_short_cga_run_reports_the_frozen_fraction():
    vit_card, mlp_card = load_card("cards/ofq_vit.json"), load_card("cards/ofq_statsq.json")
    assert {"full_precision", "statsq_2bit", "statsq_2bit_qkr", "statsq_2bit_qkr_cga"} <= set(vit_card["methods"])
    assert "statsq_2bit_cga" in mlp_card["methods"]
    card = {**vit_card, "budget": {"epochs": 2, "batch_size": 256, "eval_every": 0},
            "methods": {"ofq": {"model": {"bits": 2, "qkr": True}, "algorithm": {"name": "cga", "freeze_epochs": 1}}},
            "baseline": "ofq", "model": {"name": "vit", "dim": 8, "depth": 1, "heads": 2}}
    record = run_method(validate_card(card), "ofq", 0, progress=False)
    assert 0 < record["metrics"]["cga_frozen_fraction"] <= 1
    assert {"level_flips_first_epoch", "level_flips_last_epoch"} <= set(record["metrics"])
    assert record["curves"]["cga_frozen_fraction"][0][0] == 2
    bad = {**card, "methods": {"ofq": {"algorithm": {"name": "cga", "boundary_range": 0.7}}}}
    with pytest.raises(ValueError, match="boundary_range"):
        run_method(validate_card(bad), "ofq", 0, progress=False)


# --- oscillations by direction reversals (TrackOscillation) ------------------------------------------------------

def test_oscillations_count_direction_reversals_not_every_code_change():
    class Codes(nn.Module):  # a quantised layer whose integer codes the test sets step by step
        def __init__(self):
            super().__init__()
            self.codes = torch.zeros(5)

        def integer_weight(self):
            return self.codes.clone()

    layer = Codes()
    # per weight: up-down-up (2 reversals), up-up-down (1), up-stay-down (1: the direction is remembered across a
    # step without change), a two-level jump and back (1), monotone (0)
    steps = [[1, 1, 1, 2, 1], [0, 2, 1, 2, 2], [1, 1, 0, 0, 3]]
    state = SimpleNamespace(unwrapped_model=layer, step=0, epoch=0, logs={})
    hook = LevelFlips()
    hook.on_train_start(state)
    for i, codes in enumerate(steps):
        layer.codes = torch.tensor(codes, dtype=torch.float)
        state.step = i + 1
        if i < len(steps) - 1:
            hook.on_step_start(state)
    hook.on_epoch_end(state)
    hook.on_train_end(state)
    assert state.logs["oscillations_last_epoch"] == pytest.approx(5 / 5)  # 2 + 1 + 1 + 1 + 0 over 5 weights
    assert state.logs["level_flips_last_epoch"] == pytest.approx(13 / 5)  # every change: 3 + 3 + 2 + 2 + 3
    assert state.logs["curves"]["oscillations"] == [[1, pytest.approx(1.0)]]


def test_cga_runs_in_the_cool_down_at_the_minimum_rate_beside_a_no_freeze_control():
    """OFQ's cga.py fine-tunes with CGA after the cosine decay, at its minimum rate: in both OFQ cards the CGA
    epochs are exactly the final constant stage, held at the cosine's end, and every CGA arm has a control with
    the same model and schedule that does not freeze."""
    for name in ("ofq_statsq", "ofq_vit"):
        card = load_card(f"cards/{name}.json")
        cosine, fine_tune = card["budget"]["lr_schedule"]["stages"]
        assert cosine["shape"] == "cosine" and fine_tune["shape"] == "constant"
        assert fine_tune["lr"] == cosine["end"] < 1
        for method, spec in card["methods"].items():
            if spec.get("algorithm", {}).get("name") != "cga":
                continue
            assert spec["algorithm"]["freeze_epochs"] == fine_tune["epochs"]
            control = {k: v for k, v in spec.items() if k != "algorithm"}
            assert control in [s for m, s in card["methods"].items() if m != method], (name, method)
