"""Dataset condensation by gradient matching: DC (Zhao, Mopuri & Bilen, ICLR 2021; VICO-UoE/DatasetCondensation
``main.py``, ``utils.py``) and DCC, its contrastive-signal variant (Lee et al., "Dataset Condensation with
Contrastive Signals", ICML 2022, arXiv 2202.02916), with random selection as the reference a condensed set must beat.

A synthetic set S of ``ipc`` images per class is learned so that a network's gradient on S matches its gradient on
the real set T, over many freshly initialised networks and along their training on S (the outer / inner loops).
The two methods differ only in what is matched:

- DC, class by class:       L = sum_c D(grad l(S_c), grad l(T_c));
- DCC, summed over classes: L = D(sum_c grad l(S_c), sum_c grad l(T_c)),

where l is the mean cross-entropy of a class's batch and D the layer-wise distance of DC's ``distance_wb``: for each
weight tensor, sum over output units of (1 - cos) between the real and synthetic gradient rows (biases and norm
parameters, 1-D, count zero). A class-wise gradient carries what a class's images have in common, distractors
included; the summed gradient keeps only what separates the classes (what is common cancels in the softmax), which
is DCC's argument for data where task-irrelevant content dominates.

DCC's bi-level warm-up (saehyung-lee/dcc ``main.py``, ``--outer_warmup 250 --inner_warmup 10``): a synthetic-set
update uses DC's class-wise loss while both the iteration is below ``warmup_iterations`` and the update's index
within the iteration is below ``warmup_updates``, DCC's loss otherwise. (The official code calls DC's outer loop its
inner loop; here the names follow DC.) The official DCC code starts from random real images, for DC as for DCC.

Left out: DSA augmentation. Evaluation trains fresh networks on the set as DC's ``evaluate_synset``, 300 epochs of
SGD (lr 0.01, momentum 0.9, weight decay 5e-4, lr / 10 at half), optionally with DC's augmentation of the synthetic
images (``dc_augment``; DC's ``get_daparam`` turns it on, ``crop_scale_rotate``, for MNIST).

``shared_texture`` is the distractor DCC's premise is about: content common to all classes (a background texture
beside every digit, drawn from a small bank independently of the label), which DC's class-wise gradients must
reproduce and DCC's summed gradient cancels.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import HarnessData

# DC's (outer_loop, inner_loop) per images-per-class (utils.get_loops): the number of synthetic-set updates per
# network, and the epochs the network trains on the synthetic set between them
DC_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


class ConvNet(nn.Module):
    """DC's ConvNet: ``depth`` blocks of 3x3 conv -> instance norm (GroupNorm with one group per channel, as DC's
    'instancenorm') -> ReLU -> 2x2 average pooling, then a linear classifier. Instance norm keeps each image's
    output independent of its batch, so per-class and whole-set batches give the same per-image gradients."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, width: int = 128, depth: int = 3):
        super().__init__()
        channels, height, width_px = image_shape
        if min(height, width_px) >> depth < 1:
            raise ValueError(f"depth {depth} pools a {height}x{width_px} image below 1x1")
        layers, c = [], channels
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(width, width), nn.ReLU(), nn.AvgPool2d(2)]
            c = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * (height >> depth) * (width_px >> depth), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def gradient_distance(syn: list[torch.Tensor], real: list[torch.Tensor]) -> torch.Tensor:
    """DC's layer-wise distance: per weight tensor (rows = output units), sum of (1 - cos) between matching rows;
    1-D tensors (biases, norm affine parameters) are skipped, as ``distance_wb`` returns 0 for them."""
    total = syn[0].new_zeros(())
    for gs, gr in zip(syn, real):
        if gs.dim() == 1:
            continue
        gs, gr = gs.flatten(1), gr.flatten(1)
        total = total + (1 - (gs * gr).sum(1) / (gs.norm(dim=1) * gr.norm(dim=1) + 1e-6)).sum()
    return total


def matching_loss(net: nn.Module, x_syn: torch.Tensor, y_syn: torch.Tensor, real_batches: list[torch.Tensor],
                  contrastive: bool) -> torch.Tensor:
    """DC's (class-wise) or DCC's (summed over classes) gradient-matching loss, differentiable in ``x_syn``.
    ``real_batches[c]`` is a batch of real images of class c; each class's loss is the mean over its batch."""
    params = [p for p in net.parameters() if p.requires_grad]
    # real gradients class by class, each from its own batch (as both reference codes compute them)
    g_real = []
    for c, batch in enumerate(real_batches):
        target = torch.full((len(batch),), c, device=batch.device)
        g_real.append([g.detach() for g in torch.autograd.grad(F.cross_entropy(net(batch), target), params)])
    if contrastive:
        # sum_c l(S_c) in one forward of the whole synthetic set, as the DCC code does: each image's loss weighted by
        # 1 / (its class's size), so the gradient is sum_c grad l(S_c)
        counts = torch.bincount(y_syn, minlength=len(real_batches))
        loss = (F.cross_entropy(net(x_syn), y_syn, reduction="none") / counts[y_syn]).sum()
        g_syn = torch.autograd.grad(loss, params, create_graph=True)
        return gradient_distance(g_syn, [sum(layer) for layer in zip(*g_real)])
    loss = x_syn.new_zeros(())
    for c, g_real_c in enumerate(g_real):
        mine = y_syn == c
        g_syn = torch.autograd.grad(F.cross_entropy(net(x_syn[mine]), y_syn[mine]), params, create_graph=True)
        loss = loss + gradient_distance(g_syn, g_real_c)
    return loss


def _class_sampler(x: torch.Tensor, y: torch.Tensor, num_classes: int, generator: torch.Generator):
    by_class = [x[y == c] for c in range(num_classes)]
    if any(len(b) == 0 for b in by_class):
        raise ValueError("every class needs at least one real image to condense")

    def sample(c: int, n: int) -> torch.Tensor:  # n random images of class c (all of them if the class is smaller)
        pool = by_class[c]
        return pool[torch.randperm(len(pool), generator=generator)[:n]]

    return sample


def random_selection(x: torch.Tensor, y: torch.Tensor, num_classes: int, ipc: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` real images drawn at random from each class (the baseline a condensed set must beat)."""
    sample = _class_sampler(x, y, num_classes, generator)
    return (torch.cat([sample(c, ipc) for c in range(num_classes)]),
            torch.arange(num_classes).repeat_interleave(ipc))


def condense(x: torch.Tensor, y: torch.Tensor, num_classes: int, ipc: int, make_net, *, contrastive: bool,
             iterations: int = 1000, outer_loop: int | None = None, inner_loop: int | None = None,
             warmup_iterations: int = 250, warmup_updates: int = 10,
             lr_img: float = 0.1, lr_net: float = 0.01, batch_real: int = 256, batch_train: int = 256,
             init: str = "noise", generator: torch.Generator | None = None, progress: bool = False,
             log_every: int = 0) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Learn ``ipc`` images per class from real images ``x`` (N, C, H, W) with labels ``y`` by DC's algorithm
    (``contrastive=False``) or DCC's (``True``, after its bi-level warm-up). ``make_net()`` returns a freshly
    initialised network; the loops default to DC's ``get_loops(ipc)``. Returns the synthetic images, their labels and the loss curve
    [[iteration, mean matching loss], ...] (every ``log_every`` iterations, 0 = never)."""
    if not (isinstance(ipc, int) and ipc >= 1):
        raise ValueError(f"ipc must be an int >= 1, got {ipc!r}")
    if outer_loop is None or inner_loop is None:
        if ipc not in DC_LOOPS:
            raise ValueError(f"DC defines its loops for ipc in {sorted(DC_LOOPS)}; give outer_loop and inner_loop "
                             f"for ipc={ipc}")
        outer_loop = DC_LOOPS[ipc][0] if outer_loop is None else outer_loop
        inner_loop = DC_LOOPS[ipc][1] if inner_loop is None else inner_loop
    if init not in ("noise", "real"):
        raise ValueError(f"init must be 'noise' or 'real', got {init!r}")
    if not (isinstance(iterations, int) and iterations >= 0):
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
    if not torch.isfinite(x).all():
        raise ValueError("the real images contain NaN or infinite values")
    generator = generator or torch.Generator().manual_seed(0)
    sample = _class_sampler(x, y, num_classes, generator)
    y_syn = torch.arange(num_classes, device=x.device).repeat_interleave(ipc)
    if init == "real":
        x_syn = torch.cat([sample(c, ipc) for c in range(num_classes)]).clone()
    else:
        x_syn = torch.randn((num_classes * ipc, *x.shape[1:]), generator=generator).to(x.device)
    x_syn.requires_grad_(True)
    optimizer_img = torch.optim.SGD([x_syn], lr=lr_img, momentum=0.5)
    curve = []
    for it in tqdm(range(iterations), desc="condense", disable=not progress):
        net = make_net().to(x.device).train()
        optimizer_net = torch.optim.SGD(net.parameters(), lr=lr_net)
        total = 0.0
        for ol in range(outer_loop):
            warming_up = it < warmup_iterations and ol < warmup_updates
            real = [sample(c, batch_real) for c in range(num_classes)]
            loss = matching_loss(net, x_syn, y_syn, real, contrastive and not warming_up)
            optimizer_img.zero_grad()
            loss.backward()
            optimizer_img.step()
            total += loss.item()
            if ol == outer_loop - 1:
                break
            # train the network on the current synthetic set (DC's inner loop: epochs over shuffled batches)
            data = x_syn.detach()
            for _ in range(inner_loop):
                order = torch.randperm(len(data), generator=generator)
                for batch in order.split(batch_train):
                    optimizer_net.zero_grad()
                    F.cross_entropy(net(data[batch]), y_syn[batch]).backward()
                    optimizer_net.step()
        if log_every and (it % log_every == 0 or it == iterations - 1):
            curve.append([it, total / outer_loop])
    return x_syn.detach(), y_syn, curve


class Condensation:
    """A card's condensation method: ``"random"`` (random real images), ``"dc"`` or ``"dcc"``, with DC's defaults;
    ``build(x, y, num_classes, make_net, generator, progress)`` returns the (images, labels, loss curve)."""

    def __init__(self, method: str, ipc: int = 1, iterations: int = 1000, lr_img: float = 0.1, lr_net: float = 0.01,
                 batch_real: int = 256, init: str = "noise", outer_loop: int | None = None,
                 inner_loop: int | None = None, warmup_iterations: int = 250, warmup_updates: int = 10):
        if method not in ("random", "dc", "dcc"):
            raise ValueError(f"method must be 'random', 'dc' or 'dcc', got {method!r}")
        if not (isinstance(ipc, int) and ipc >= 1):
            raise ValueError(f"ipc must be an int >= 1, got {ipc!r}")
        if method != "random" and (outer_loop is None or inner_loop is None) and ipc not in DC_LOOPS:
            raise ValueError(f"DC defines its loops for ipc in {sorted(DC_LOOPS)}; give outer_loop and inner_loop")
        for name, value in (("lr_img", lr_img), ("lr_net", lr_net)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        for name, value, least in (("iterations", iterations, 0), ("batch_real", batch_real, 1),
                                   ("warmup_iterations", warmup_iterations, 0), ("warmup_updates", warmup_updates, 0)):
            if not (isinstance(value, int) and value >= least):
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if init not in ("noise", "real"):
            raise ValueError(f"init must be 'noise' or 'real', got {init!r}")
        self.method, self.ipc = method, ipc
        self.options = dict(iterations=iterations, lr_img=lr_img, lr_net=lr_net, batch_real=batch_real, init=init,
                            outer_loop=outer_loop, inner_loop=inner_loop)
        if method == "dcc":
            self.options.update(warmup_iterations=warmup_iterations, warmup_updates=warmup_updates)

    def build(self, x, y, num_classes, make_net, generator, progress=False):
        if self.method == "random":
            return (*random_selection(x, y, num_classes, self.ipc, generator), [])
        log_every = max(1, self.options["iterations"] // 20)
        return condense(x, y, num_classes, self.ipc, make_net, contrastive=self.method == "dcc", generator=generator,
                        progress=progress, log_every=log_every, **self.options)


def dc_augment_params(image_shape: tuple[int, int, int]) -> dict:
    """DC's MNIST augmentation (``get_daparam``: crop 4, scale 0.2, rotate 45, strategy ``crop_scale_rotate``), the
    crop scaled from 28 px to the image height (1 px for 8 x 8 digits)."""
    return {"crop": max(1, round(4 * image_shape[1] / 28)), "scale": 0.2, "rotate": 45,
            "strategy": ("crop", "scale", "rotate")}


def dc_augment(images: torch.Tensor, params: dict, generator: np.random.Generator) -> torch.Tensor:
    """DC's ``augment``: each image gets ONE of the strategies, drawn uniformly: ``crop`` (pad by ``crop`` with the
    batch's mean, cut at a random offset in [0, 2 crop)), ``scale`` (nearest-neighbour resize of height and width by
    independent factors in [1 - scale, 1 + scale], centred and cut or zero-padded back) or ``rotate`` (scipy's cubic
    rotation by an integer angle in [-rotate, rotate), mean-filled, centre crop). Returns a new tensor."""
    from scipy.ndimage import rotate as scipy_rotate

    out = images.detach().clone()
    n, c, h, w = out.shape
    mean = out.mean(dim=(0, 2, 3))
    crop, scale, angle = params["crop"], params["scale"], params["rotate"]
    for i in range(n):
        choice = params["strategy"][generator.integers(len(params["strategy"]))]
        if choice == "crop":
            padded = mean.view(c, 1, 1).expand(c, h + 2 * crop, w + 2 * crop).clone()
            padded[:, crop:crop + h, crop:crop + w] = out[i]
            r, q = generator.integers(2 * crop), generator.integers(2 * crop)
            out[i] = padded[:, r:r + h, q:q + w]
        elif choice == "scale":
            sh, sw = int(generator.uniform(1 - scale, 1 + scale) * h), int(generator.uniform(1 - scale, 1 + scale) * w)
            resized = F.interpolate(out[i:i + 1], [sh, sw])[0]
            big_h, big_w = max(sh, h), max(sw, w)
            canvas = torch.zeros(c, big_h, big_w, dtype=out.dtype, device=out.device)
            canvas[:, (big_h - sh) // 2:(big_h - sh) // 2 + sh, (big_w - sw) // 2:(big_w - sw) // 2 + sw] = resized
            r, q = (big_h - h) // 2, (big_w - w) // 2
            out[i] = canvas[:, r:r + h, q:q + w]
        else:
            turned = scipy_rotate(out[i].cpu().numpy(), angle=int(generator.integers(-angle, angle)), axes=(-2, -1),
                                  cval=float(mean.mean()))
            # a square image's rotated box always covers it (DC's case); a wide one's can be narrower: mean-fill
            th, tw = turned.shape[-2:]
            canvas = np.full((c, max(th, h), max(tw, w)), float(mean.mean()), dtype=turned.dtype)
            canvas[:, (canvas.shape[1] - th) // 2:(canvas.shape[1] - th) // 2 + th,
                   (canvas.shape[2] - tw) // 2:(canvas.shape[2] - tw) // 2 + tw] = turned
            r, q = (canvas.shape[1] - h) // 2, (canvas.shape[2] - w) // 2
            out[i] = torch.from_numpy(canvas[:, r:r + h, q:q + w]).to(out)
    return out


def evaluate_synset(x_syn: torch.Tensor, y_syn: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, make_net,
                    *, epochs: int = 300, lr: float = 0.01, batch_train: int = 256,
                    generator: torch.Generator | None = None, augment: dict | None = None) -> float:
    """Test accuracy of a fresh ``make_net()`` trained on the synthetic set as DC's ``evaluate_synset``: SGD with
    momentum 0.9 and weight decay 5e-4 for ``epochs`` (+1) epochs, the learning rate divided by 10 after half; with
    ``augment`` (``dc_augment_params``) every training batch is augmented by ``dc_augment``."""
    generator = generator or torch.Generator().manual_seed(0)
    rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=generator))) if augment else None
    net = make_net().to(x_syn.device).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    for epoch in range(epochs + 1):
        for batch in torch.randperm(len(x_syn), generator=generator).split(batch_train):
            images = x_syn[batch] if augment is None else dc_augment(x_syn[batch], augment, rng)
            optimizer.zero_grad()
            F.cross_entropy(net(images), y_syn[batch]).backward()
            optimizer.step()
        if epoch == epochs // 2 + 1:  # DC rebuilds the optimizer with lr / 10 (fresh momentum)
            optimizer = torch.optim.SGD(net.parameters(), lr=lr / 10, momentum=0.9, weight_decay=5e-4)
    net.eval()
    with torch.no_grad():
        correct = sum((net(xb).argmax(1) == yb).sum().item() for xb, yb in zip(x_test.split(1024), y_test.split(1024)))
    return correct / len(y_test)


def texture_bank(height: int, width: int, count: int, seed: int = 71_000) -> torch.Tensor:
    """``count`` smooth random textures (height x width) in [0, 1]: white noise low-passed by a 3 x 3 box filter twice
    (tiled, so the texture wraps around) and stretched to the full range."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(count, 1, height, width, generator=g)
    for _ in range(2):
        t = F.avg_pool2d(F.pad(t, (1, 1, 1, 1), mode="circular"), 3, stride=1)
    lo, hi = t.amin(dim=(1, 2, 3), keepdim=True), t.amax(dim=(1, 2, 3), keepdim=True)
    return ((t - lo) / (hi - lo))[:, 0]


def shared_texture(data: HarnessData, seed: int, count: int = 1, textures: int = 4) -> HarnessData:
    """Content common to all classes, DCC's premise (Lee et al., ICML 2022, Sec. 3): beside each image ``count``
    blocks of the image's size, each one of ``textures`` fixed background textures (``texture_bank``) chosen at
    random per image and block, independently of the label; the same bank for training and test images. Needs an
    image data set; the images become (C, H, W (count + 1))."""
    if data.image_shape is None:
        raise ValueError("shared_texture needs an image data set (digits or mnist5k)")
    for name, value in (("count", count), ("textures", textures)):
        if isinstance(value, bool) or not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    c, h, w = data.image_shape
    bank = texture_bank(h, w, textures).to(data.x_train.dtype)
    gen = torch.Generator().manual_seed(72_000 + seed)

    def build(x):
        images = x.view(-1, c, h, w)
        blocks = [images] + [bank[torch.randint(textures, (len(images),), generator=gen)][:, None].expand(-1, c, h, w)
                             for _ in range(count)]
        return torch.cat(blocks, dim=3).flatten(1)

    return HarnessData(build(data.x_train), data.y_train, build(data.x_test), data.y_test, data.num_classes,
                       dict(data.train_extra), dict(data.test_extra), (c, h, w * (count + 1)))
