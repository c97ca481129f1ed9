"""The batched, per-sample photometric ops equal torchvision's per-image functional ops (float64)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import chi2
from torchvision.transforms import functional as TF

from pipelines.augment import JITTER_ORDERS, MultiCropRecipe, ViewSpec
from pipelines.device_augment import augment_view, augment_views, color_jitter, gaussian_blur, grayscale, solarize


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(6, 3, 20, 24, generator=g, dtype=torch.float64)


def test_color_jitter_equals_torchvision_per_sample(images):
    g = torch.Generator().manual_seed(1)
    n = len(images)
    b, c, s = (0.6 + 0.8 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(3))
    h = -0.1 + 0.2 * torch.rand(n, generator=g, dtype=torch.float64)
    out = color_jitter(images, b, c, s, h)
    for i in range(n):
        ref = TF.adjust_brightness(images[i], float(b[i]))
        ref = TF.adjust_contrast(ref, float(c[i]))
        ref = TF.adjust_saturation(ref, float(s[i]))
        ref = TF.adjust_hue(ref, float(h[i]))
        torch.testing.assert_close(out[i], ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("order", range(len(JITTER_ORDERS)))
def test_color_jitter_in_every_order_equals_torchvision_per_sample(images, order):
    """Each row in its own order (this one, its neighbours the next orders): torchvision's steps in that order."""
    g = torch.Generator().manual_seed(order)
    n = len(images)
    b, c, s = (0.6 + 0.8 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(3))
    h = -0.1 + 0.2 * torch.rand(n, generator=g, dtype=torch.float64)
    orders = (order + torch.arange(n) % 3) % len(JITTER_ORDERS)
    out = color_jitter(images, b, c, s, h, order=orders)
    steps = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(n):
        ref = images[i]
        for step in JITTER_ORDERS[int(orders[i])]:
            ref = steps[step](ref, float((b, c, s, h)[step][i]))
        # 1e-5: torchvision's HSV round trip differs from the closed form by ~1e-6 at near-gray pixels
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_blur_has_one_sigma_per_image_and_equals_torchvision(images):
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.7], dtype=torch.float64)
    out = gaussian_blur(images, sigma)
    window = 2 * math.ceil(3 * float(sigma.max())) + 1
    for i in range(len(images)):
        ref = TF.gaussian_blur(images[i], kernel_size=[window, window], sigma=[float(sigma[i])] * 2)
        torch.testing.assert_close(out[i], ref, atol=1e-9, rtol=0)


def test_grayscale_and_solarize_equal_torchvision(images):
    torch.testing.assert_close(grayscale(images), TF.rgb_to_grayscale(images), atol=1e-12, rtol=0)
    torch.testing.assert_close(solarize(images), TF.solarize(images, 128 / 255), atol=0, rtol=0)


def test_augment_view_contract():
    recipe = MultiCropRecipe(global_size=16, local_size=8, num_local=2)
    crops = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    x = augment_view(crops, recipe, recipe.view(1), g, dtype=torch.bfloat16)
    assert x.shape == (5, 3, 16, 16) and x.dtype == torch.bfloat16
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(x.float()).all()
    # With every step off, it is exactly normalisation.
    quiet = MultiCropRecipe(global_size=16, local_size=8, num_local=2, flip_p=0, jitter_p=0, grayscale_p=0,
                            blur_p=(0, 0, 0), solarize_p=(0, 0, 0))
    y = augment_view(crops, quiet, quiet.view(0), g)
    mean, std = torch.tensor(quiet.mean).view(1, 3, 1, 1), torch.tensor(quiet.std).view(1, 3, 1, 1)
    torch.testing.assert_close(y, (crops.permute(0, 3, 1, 2).float() / 255 - mean) / std)


def test_the_compiled_colour_jitter_computes_the_eager_one(monkeypatch):
    """On a CPU the loaders run inductor's build of `jitter_step` (the rest of the suite runs the eager
    step: FASTSSL_EAGER_AUGMENT=1 in conftest): each of the four steps, at two sizes and factors across
    their ranges, equals the eager step to float rounding (6e-8 measured), and builds without the
    warning that falls back to eager."""
    import warnings

    import pipelines.device_augment as da

    monkeypatch.delenv("FASTSSL_EAGER_AUGMENT", raising=False)
    monkeypatch.setattr(da, "_compiled_step", None)
    step = da._jitter_step_for(torch.device("cpu"))
    assert step is not da.jitter_step
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed build falls back to eager with a warning: here, a failure
        for n, size in ((5, 16), (3, 8)):
            x = torch.rand(n, 3, size, size, generator=g)
            for s, (low, high) in enumerate(((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))):
                factor = low + (high - low) * torch.rand(n, generator=g)
                torch.testing.assert_close(step(x, s, factor), da.jitter_step(x, s, factor), rtol=0, atol=1e-6,
                                           msg=f"step {s}, {n} x {size}")


ALL_STEPS = MultiCropRecipe(global_size=16, local_size=8, num_local=2, flip_p=0.5, jitter_p=0.8, grayscale_p=0.2,
                            blur_p=(0.5, 0.5, 0.5), solarize_p=(0.5, 0.5, 0.5))


def test_augment_view_reads_no_value_from_the_device():
    """On the meta device every op is shape-only, so any value read back from the device (a
    `nonzero()`, a `.item()`, a `float(...)`, each a GPU wait on CUDA) raises: the batch is
    prepared from host draws alone. The same draws on the CPU: rows chosen, all finite."""
    crops = torch.randint(0, 256, (12, 16, 16, 3), dtype=torch.uint8)
    for view in range(3):
        out = augment_view(crops.to("meta"), ALL_STEPS, ALL_STEPS.view(view), torch.Generator().manual_seed(view))
        assert out.device.type == "meta" and out.shape == (12, 3, 16, 16)
        on_cpu = augment_view(crops, ALL_STEPS, ALL_STEPS.view(view), torch.Generator().manual_seed(view))
        assert torch.isfinite(on_cpu).all()


def device_ops(fn) -> int:
    """How many ops `fn` dispatches on the meta device: what a GPU would launch (host draws not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in torch.utils._pytree.tree_leaves(out)):
                self.n += 1
            return out

    with Count() as count:
        fn()
    return count.n


def test_views_of_one_size_are_augmented_as_one_batch():
    """The launches per batch do not grow with the number of local views: 6 local views cost the ops of 2
    (the recipe's 2 x 224 + 6 x 96 would otherwise be ~1,400 launches a step instead of ~380)."""
    def ops(num_local: int) -> int:
        recipe = MultiCropRecipe(global_size=16, local_size=8, num_local=num_local)
        crops = [torch.zeros(12, v.size, v.size, 3, dtype=torch.uint8, device="meta") for v in recipe.views()]
        out = augment_views(crops, recipe, recipe.views(), torch.Generator().manual_seed(0))
        assert [x.shape for x in out] == [(12, 3, v.size, v.size) for v in recipe.views()]
        return device_ops(lambda: augment_views(crops, recipe, recipe.views(), torch.Generator().manual_seed(0)))

    assert ops(6) == ops(2)


def test_views_of_one_size_need_not_be_adjacent():
    """Sizes in the order A, b, A, b with a different row count per view: each view gets back its own rows,
    augmented with its own probability (solarize p 1 on views 0 and 3, 0 on 1 and 2; a constant 200 becomes 55)."""
    views = [ViewSpec(8, (0.1, 1.0), 0.0, 1.0), ViewSpec(4, (0.1, 1.0), 0.0, 0.0),
             ViewSpec(8, (0.1, 1.0), 0.0, 0.0), ViewSpec(4, (0.1, 1.0), 0.0, 1.0)]
    recipe = MultiCropRecipe(flip_p=0, jitter_p=0, grayscale_p=0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    rows = (3, 5, 7, 2)
    crops = [torch.full((n, v.size, v.size, 3), 200, dtype=torch.uint8) for n, v in zip(rows, views)]
    crops = [x + torch.arange(len(x), dtype=torch.uint8).view(-1, 1, 1, 1) for x in crops]  # row i: 200 + i
    out = augment_views(crops, recipe, views, torch.Generator().manual_seed(0))
    for v, (x, n, view) in enumerate(zip(out, rows, views)):
        assert x.shape == (n, 3, view.size, view.size), v
        expected = (200 + torch.arange(n, dtype=torch.float32)) / 255
        if view.solarize_p:
            expected = 1 - expected
        torch.testing.assert_close(x.amax(dim=(1, 2, 3)), expected, atol=1e-6, rtol=0, msg=f"view {v}")


def test_each_view_of_a_batch_draws_its_own_probability():
    """Views concatenated into one batch keep their own solarize and blur rates: with constant crops
    (solarize maps 200 to 55, a blur leaves them unchanged) the solarized rows of each view are
    Binomial(n, p_view), within 5 sigma, and a view with p = 0 or 1 is exact."""
    n, probs = 4000, (0.0, 0.2, 0.7, 1.0)
    views = [ViewSpec(8, (0.05, 0.14), blur_p=p, solarize_p=p) for p in probs]
    recipe = MultiCropRecipe(global_size=8, local_size=8, num_local=2, flip_p=0, jitter_p=0, grayscale_p=0,
                             mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    crops = [torch.full((n, 8, 8, 3), 200, dtype=torch.uint8) for _ in views]
    out = augment_views(crops, recipe, views, torch.Generator().manual_seed(0))
    for p, x in zip(probs, out):
        solarized = (x.flatten(1) - 55 / 255).abs().amax(dim=1) < 1e-5
        untouched = (x.flatten(1) - 200 / 255).abs().amax(dim=1) < 1e-5
        assert bool((solarized | untouched).all())
        k = int(solarized.sum())
        assert abs(k - n * p) <= 5 * math.sqrt(n * p * (1 - p)), (p, k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none is visible)")
def test_augment_view_on_cuda_never_synchronises_and_equals_the_cpu():
    crops = torch.randint(0, 256, (64, 16, 16, 3), dtype=torch.uint8)
    cpu = [augment_view(crops, ALL_STEPS, ALL_STEPS.view(v), torch.Generator().manual_seed(v)) for v in range(3)]
    augment_view(crops.cuda(), ALL_STEPS, ALL_STEPS.view(0), torch.Generator().manual_seed(0))  # constants cached
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = [augment_view(crops.pin_memory().cuda(non_blocking=True), ALL_STEPS, ALL_STEPS.view(v),
                            torch.Generator().manual_seed(v)) for v in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(cpu, gpu):  # same host draws, so the same rows and factors: equal to rounding
        torch.testing.assert_close(b.cpu(), a, atol=2e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none is visible)")
def test_augment_views_on_cuda_never_synchronises_and_equals_the_cpu():
    """Every view of a recipe whose views of one size differ in blur and solarize probability (the per-row
    probabilities, drawn on the host): no wait for the device, and the CPU's rows and factors."""
    recipe = MultiCropRecipe(global_size=16, local_size=8, num_local=3, blur_p=(1.0, 0.1, 0.5),
                             solarize_p=(0.0, 0.2, 0.0))
    views = recipe.views()
    crops = [torch.randint(0, 256, (32, v.size, v.size, 3), dtype=torch.uint8) for v in views]
    cpu = augment_views(crops, recipe, views, torch.Generator().manual_seed(0))
    augment_views([x.cuda() for x in crops], recipe, views, torch.Generator().manual_seed(0))  # constants cached
    on_device = [x.pin_memory().cuda(non_blocking=True) for x in crops]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = augment_views(on_device, recipe, views, torch.Generator().manual_seed(0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(cpu, gpu):
        assert b.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(b.cpu(), a, atol=2e-4, rtol=0)


def ks_distance(samples, lo: float, hi: float) -> float:
    """Kolmogorov-Smirnov distance sup |F_n - F| between the samples and U(lo, hi), float64."""
    x = np.sort(np.asarray(samples, dtype=np.float64))
    n, cdf = len(x), np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    i = np.arange(1, n + 1)
    return float(max((i / n - cdf).max(), (cdf - (i - 1) / n).max()))


def ks_critical(n: int, alpha: float = 1e-4) -> float:
    """The DKW bound (Massart): P(sup |F_n - F| > this) <= alpha for n draws of any continuous F."""
    return math.sqrt(math.log(2 / alpha) / (2 * n))


def test_augment_view_draws_every_parameter_over_the_recipe_range(monkeypatch):
    """The factors the jitter and the sigmas the blur receive, n = 2000 rows, are U(1-b, 1+b), U(1-c, 1+c),
    U(1-s, 1+s), U(-h, h) and U(0.1, 2) with the default recipe's values, the authors' (b, c, s, h) =
    (0.4, 0.4, 0.2, 0.1) (NOTES; torchvision's ColorJitter, DINO's blur): a KS distance under the DKW bound
    at 1e-4 (a right sampler fails 1 seed in 10^4)."""
    import pipelines.device_augment as da

    recipe = MultiCropRecipe(global_size=8, num_local=0, flip_p=0.0, jitter_p=1.0, grayscale_p=0.0,
                             blur_p=(1.0, 1.0, 1.0), solarize_p=(0.0, 0.0, 0.0))
    drawn = {}

    def jitter(x, *factors, order, step):
        drawn.update(zip(("brightness", "contrast", "saturation", "hue"), factors))
        drawn["order"] = order
        return x

    def blur(x, sigma):
        drawn["sigma"] = sigma
        return x

    monkeypatch.setattr(da, "color_jitter", jitter)
    monkeypatch.setattr(da, "gaussian_blur", blur)
    n = 2000
    crops = torch.zeros(n, 8, 8, 3, dtype=torch.uint8)
    da.augment_view(crops, recipe, recipe.view(0), torch.Generator().manual_seed(0))
    b, c, s, h = 0.4, 0.4, 0.2, 0.1
    ranges = {"brightness": (1 - b, 1 + b), "contrast": (1 - c, 1 + c), "saturation": (1 - s, 1 + s),
              "hue": (-h, h), "sigma": (0.1, 2.0)}
    for name, (lo, hi) in ranges.items():
        assert len(drawn[name]) == n, name
        assert ks_distance(drawn[name], lo, hi) < ks_critical(n), name
    # torchvision's ColorJitter draws its steps' order by randperm(4): each of the 24 orders with
    # probability 1/24 (a chi-square test at 1e-4).
    counts = np.bincount(drawn["order"].numpy(), minlength=len(JITTER_ORDERS))
    assert len(counts) == len(JITTER_ORDERS)
    expected = n / len(JITTER_ORDERS)
    assert chi2.sf(((counts - expected) ** 2 / expected).sum(), len(JITTER_ORDERS) - 1) > 1e-4, counts
    da.augment_view(crops, replace(recipe, jitter_order="fixed"), recipe.view(0), torch.Generator().manual_seed(0))
    assert not drawn["order"].any()
