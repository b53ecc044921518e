"""AdjointDPMPipeline on the default model: the paper's three uses lower their losses; gradients reach
the right inputs; results agree with checkpointed backprop."""

import importlib.util
from pathlib import Path

import pytest
import torch

import diffkit
from diffkit.pipelines import AdjointDPMPipeline


def _uses():
    spec = importlib.util.spec_from_file_location("adjoint_uses", Path(__file__).resolve().parents[1] / "scripts" / "adjoint_uses.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pipe():
    pipe = AdjointDPMPipeline.from_pipe(diffkit.load_pipeline())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("use", ["embedding", "finetune", "audit"])
def test_each_use_lowers_its_loss(use):
    # a smaller step for the audit: its full-run rate (0.05) overshoots in 4 iterations
    lr = 0.01 if use == "audit" else None
    losses, before, after, merit = _uses().run(use, _pipe(), iterations=4, steps=8, lr_override=lr)
    assert losses[-1] < losses[0], losses
    assert not torch.allclose(before, after)


def test_pipeline_gradients_match_checkpointed_backprop():
    pipe = _pipe()
    for p in pipe.unet.parameters():
        p.requires_grad_(False)
    embeds = pipe.unet.class_embedding(torch.tensor([3, 5])).detach()
    grads = {}
    for backend in ("adjoint", "checkpoint"):
        x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        e = embeds.clone().requires_grad_(True)
        images = pipe(class_labels=[3, 5], class_embeds=e, latents=x_T, num_inference_steps=50, gradient_backend=backend).images
        images.square().mean().backward()
        grads[backend] = torch.cat([x_T.grad.flatten(), e.grad.flatten()])
    rel = (grads["adjoint"] - grads["checkpoint"]).norm() / grads["checkpoint"].norm()
    assert rel <= 5e-2, rel.item()


def test_class_embeds_must_match_the_batch():
    with pytest.raises(ValueError, match="class_embeds"):
        _pipe()(class_labels=[1, 2], class_embeds=torch.zeros(3, 64), num_inference_steps=2)


# -- every latent text family --------------------------------------------------------------------------------


def _family_pipe(family):
    from test_real_models import diffusers_pipe

    pipe = AdjointDPMPipeline.from_pipe(diffusers_pipe(family))
    pipe.set_progress_bar_config(disable=True)
    for p in pipe.network.parameters():
        p.requires_grad_(False)
    return pipe


def _family_grads(pipe, backend, steps, saved=None):
    """Gradients of a loss on the decoded images to x_T, the prompt embeddings, the pooled embeddings (SDXL / SD3 /
    Flux) and the backbone's last two parameter tensors; ``saved`` collects the bytes autograd keeps."""
    text = {"max_sequence_length": 16} if pipe.family in ("sd3", "flux") else {}
    cond, uncond, _ = pipe.encode_condition(prompt="a red fox", negative_prompt="blurry", height=16, width=24, **text)
    pooled_key = {"sdxl": "text_embeds", "sd3": "pooled_projections", "flux": "pooled_projections"}.get(pipe.family)
    x_T = torch.randn(1, pipe.latent_channels, 8, 12, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    embeds = cond["encoder_hidden_states"].detach().clone().requires_grad_(True)
    leaves = [x_T, embeds]
    kwargs = dict(prompt_embeds=embeds, negative_prompt_embeds=uncond["encoder_hidden_states"])
    if pooled_key:
        pooled = cond[pooled_key].detach().clone().requires_grad_(True)
        leaves.append(pooled)
        kwargs.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=uncond[pooled_key])
    params = list(pipe.network.parameters())[-2:]
    for p in params:
        p.requires_grad_(True)
        p.grad = None

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack if saved else (lambda t: t), lambda t: t):
        images = pipe(latents=x_T, num_inference_steps=steps, guidance_scale=3.0, params=params,
                      gradient_backend=backend, height=16, width=24, **kwargs).images
    images.square().mean().backward()
    for p in params:
        p.requires_grad_(False)
    return [leaf.grad for leaf in leaves] + [torch.cat([p.grad.flatten() for p in params])]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_adjoint_gradients_on_every_text_family(family):
    """Gradients to the latents, the prompt embeddings, the pooled embeddings and parameters reach every family (SD3
    and Flux in flow time) and agree with checkpointed backprop through the same sampler (measured at 10 steps:
    0.2-2% on tiny random components)."""
    pipe = _family_pipe(family)
    adjoint, exact = _family_grads(pipe, "adjoint", 10), _family_grads(pipe, "checkpoint", 10)
    for name, a, b in zip(("latents", "prompt_embeds", "pooled", "params"), adjoint, exact):
        assert b.abs().sum() > 0 and torch.isfinite(a).all(), name
        assert ((a - b).norm() / b.norm()).item() < 5e-2, name


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_adjoint_memory_is_flat_in_the_steps_on_text_families(family):
    """What autograd keeps from a whole pipeline call (sampling and VAE decoding): the same at 3 and 9 adjoint steps;
    checkpointed backprop keeps one input per step."""
    pipe = _family_pipe(family)
    sizes = {}
    for backend in ("adjoint", "checkpoint"):
        for steps in (3, 9):
            saved = [0]
            _family_grads(pipe, backend, steps, saved)
            sizes[backend, steps] = saved[0]
    assert sizes["adjoint", 3] == sizes["adjoint", 9]
    assert sizes["checkpoint", 9] > sizes["checkpoint", 3]
