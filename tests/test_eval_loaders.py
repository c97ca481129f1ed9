"""The DALI eval loader keeps EvalLoader's contract: same images, order, shards, pixels (nearly), skips.

Measured on the textured folder below (crop 32, normalised units, CPU decode):
PIL bilinear vs DALI linear + antialias with torchvision's geometry differ by mean abs
~0.003 and max abs ~0.018 (about 0.2 and 1 grey levels), PIL vs DALI bicubic likewise,
while bilinear vs bicubic differ by ~0.036 on average; a 1-pixel shift of the crop
differs by ~0.29 on average (0.17 on the smoothest image), and a missing normalisation
by ~0.56. So a mean tolerance of 0.02 is >8x below a one-pixel shift on every image.
"""

from __future__ import annotations

import shutil
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_recipe, load_tool, requires_dali
from fastssl.config import Config, ConfigError, validate
from pipelines.augment import IMAGENET_MEAN, IMAGENET_STD, EvalView
from pipelines.eval import EvalBackendError, build_eval_loader

SIZE = 32  # resize round(32 / 0.875) = 37, crop 32: odd margins, so the crop's rounding matters
IMAGE_SHAPES = [(40, 47), (64, 80), (97, 61), (120, 150)]  # (height, width): landscape, portrait, square-ish
MEAN_TOL, MAX_TOL = 0.02, 0.1  # normalised units; see the module docstring for the measurements


def make_textured_folder(root: Path, num_classes: int = 3, per_class: int = 5, seed: int = 0,
                         tint: int = 0) -> None:
    """ImageNet layout of smooth random JPEGs of several sizes (a uniform colour would hide a shifted crop);
    `tint` > 0 lifts channel c of class c, so that classes differ and a k-NN has something to find."""
    rng = np.random.default_rng(seed)
    k = 0
    for c in range(num_classes):
        (root / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            h, w = IMAGE_SHAPES[k % len(IMAGE_SHAPES)]
            coarse = rng.integers(0, 256 - tint, (h // 6 + 2, w // 6 + 2, 3), dtype=np.uint8)
            coarse[..., c % 3] += np.uint8(tint)
            Image.fromarray(coarse).resize((w, h), Image.BILINEAR).save(root / f"class_{c:02d}" / f"img_{j:03d}.JPEG",
                                                                        quality=95)
            k += 1


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evalfolder") / "val"
    make_textured_folder(root)
    return root


def read_all(backend: str, root: Path, batch_size: int = 4, view: EvalView = EvalView(SIZE),
             **kw) -> list[tuple[torch.Tensor, ...]]:
    """Every batch; in-process PIL reads (warnings reach the test) and one DALI thread (a small CI box)."""
    workers = 1 if backend == "dali" else 0
    return list(build_eval_loader(backend, str(root), view, batch_size, num_workers=workers, **kw))


def cat(batches, k: int) -> torch.Tensor:
    return torch.cat([b[k] for b in batches])


@requires_dali
@pytest.mark.parametrize("rank, world_size", [(0, 1), (0, 2), (1, 2)])
def test_same_batches_order_and_shards(folder, rank, world_size):
    ref = read_all("torchvision", folder, rank=rank, world_size=world_size)
    got = read_all("dali", folder, rank=rank, world_size=world_size)
    assert [len(b[2]) for b in got] == [len(b[2]) for b in ref]  # including the last partial batch
    assert torch.equal(cat(got, 2), cat(ref, 2)) and torch.equal(cat(got, 1), cat(ref, 1))
    assert cat(got, 2).tolist() == list(range(rank, 15, world_size))  # each of this rank's images once
    images = got[0][0]
    assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)


@requires_dali
def test_two_ranks_cover_every_image_once_and_an_empty_shard_is_empty(folder):
    shares = [cat(read_all("dali", folder, rank=r, world_size=2), 2).tolist() for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == list(range(15))
    assert read_all("dali", folder, rank=17, world_size=20) == []


def one_pixel_shift(path: str) -> float:
    """Mean abs change of the normalised eval crop when it moves by one pixel along the long side."""
    from torchvision import transforms as T

    img = T.Resize(round(SIZE / 0.875), interpolation=T.InterpolationMode.BILINEAR)(Image.open(path).convert("RGB"))
    x = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(img))
    h, w = x.shape[1:]
    top, left = round((h - SIZE) / 2), round((w - SIZE) / 2)
    dy, dx = (0, 1) if w > h else (1, 0)
    a = x[:, top : top + SIZE, left : left + SIZE]
    b = x[:, top + dy : top + dy + SIZE, left + dx : left + dx + SIZE]
    return (a - b).abs().mean().item()


@requires_dali
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])  # on a GPU: nvJPEG (mixed), GPU resize
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_pixels_match_pil(folder, interpolation, device):
    ref = read_all("torchvision", folder, view=EvalView(SIZE, interpolation))
    got = [tuple(x.cpu() for x in b) for b in read_all("dali", folder, view=EvalView(SIZE, interpolation),
                                                       device=torch.device(device))]
    diff = (cat(ref, 0) - cat(got, 0)).abs()
    per_image = diff.mean(dim=(1, 2, 3))
    print(f"PIL vs DALI {interpolation} + antialias: max abs {diff.max():.4f}, mean abs {diff.mean():.4f} (normalised)")
    assert per_image.max() < MEAN_TOL and diff.max() < MAX_TOL
    # DALI used the filter asked for: it is much further from PIL's other one.
    other = read_all("torchvision", folder, view=EvalView(SIZE, ({"bilinear", "bicubic"} - {interpolation}).pop()))
    assert (cat(other, 0) - cat(got, 0)).abs().mean() > 5 * diff.mean()
    # The tolerance must catch the mistakes it is there for: a crop one pixel off, no normalisation.
    from pipelines.folder import scan_image_folder

    shifts = [one_pixel_shift(p) for p, _ in scan_image_folder(folder)[0]]
    print(f"1-pixel shift: mean abs {np.mean(shifts):.4f} (min over images {min(shifts):.4f})")
    assert min(shifts) > 5 * MEAN_TOL
    std, mean = torch.tensor(IMAGENET_STD)[:, None, None], torch.tensor(IMAGENET_MEAN)[:, None, None]
    assert (cat(ref, 0) - (cat(ref, 0) * std + mean)).abs().mean() > 10 * MEAN_TOL


@requires_dali
def test_bad_files_are_skipped_with_a_warning(folder, tmp_path):
    root = tmp_path / "val"
    shutil.copytree(folder, root)
    good = (root / "class_00" / "img_000.JPEG").read_bytes()
    (root / "class_00" / "img_001.JPEG").write_bytes(good[: len(good) // 2])  # cut short: screened by its bytes
    (root / "class_01" / "img_002.JPEG").write_text("not an image at all, only some text here")
    # whole-looking JPEG (start and end markers) with garbage inside: only the decoder finds out
    (root / "class_02" / "img_003.JPEG").write_bytes(good[:4] + b"\x00\x07garbage" * 40 + b"\xff\xd9")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        ref = read_all("torchvision", root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = read_all("dali", root)
    messages = [str(w.message) for w in caught if "skipping unreadable image" in str(w.message)]
    assert {m.split()[3].rstrip(":") for m in messages} == {str(root / "class_00" / "img_001.JPEG"),
                                                 str(root / "class_01" / "img_002.JPEG"),
                                                 str(root / "class_02" / "img_003.JPEG")}
    assert cat(got, 2).tolist() == cat(ref, 2).tolist() == [i for i in range(15) if i not in (1, 7, 13)]
    assert torch.equal(cat(got, 1), cat(ref, 1))


def test_unknown_backend_is_named(folder):
    with pytest.raises(EvalBackendError, match="unknown eval loader 'pil'; choose one of torchvision, dali"):
        build_eval_loader("pil", str(folder), EvalView(SIZE), 4)


def test_missing_dali_names_the_install_command(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if DALI were not installed
    monkeypatch.delitem(sys.modules, "pipelines.dali_eval", raising=False)
    with pytest.raises(EvalBackendError, match=r"make setup.*--loader torchvision; in a recipe, --eval.loader torchvision"):
        build_eval_loader("dali", str(folder), EvalView(SIZE), 4)


def test_config_checks_the_eval_loader():
    cfg = Config()
    cfg.data.train, cfg.eval.loader = "/some/train", "pil"
    with pytest.raises(ConfigError, match="eval.loader: unknown 'pil'"):
        validate(cfg)


@requires_dali
def test_eval_knn_with_dali_gives_the_torchvision_figure(tmp_path_factory):
    """Same geometry and sub-grey-level pixel differences: features agree, so the k-NN votes do too.

    The tiny run's own folders are uniform colours at chance level, which would hide a broken
    loader; tinted textured folders of several sizes give the k-NN something to get right.
    """
    from accelerate import Accelerator

    from test_engine import tiny_config
    from fastssl.engine import train
    from fastssl.eval.backbone_io import load_backbone
    from fastssl.eval.online import embed

    tmp = tmp_path_factory.mktemp("knn_dali")
    cfg = tiny_config(tmp, epochs=1)
    train(cfg)
    make_textured_folder(tmp / "tinted" / "train", per_class=8, seed=1, tint=32)
    make_textured_folder(tmp / "tinted" / "val", per_class=4, seed=2, tint=32)
    data = ["--train", str(tmp / "tinted" / "train"), "--val", str(tmp / "tinted" / "val")]
    tool = load_tool("eval_knn")
    reports = {name: tool.main([cfg.train.run_dir, *data, "--ks", "5,20", "--loader", name, "--device", "cpu",
                                "--num-workers", "1" if name == "dali" else "0",
                                "--json", str(tmp / f"{name}.json")]) for name in ("torchvision", "dali")}
    print({name: r["k"] for name, r in reports.items()})
    assert reports["dali"]["loader"] == "dali" and reports["torchvision"]["k"]["5"]["top1"] > 50  # above chance
    for k in ("5", "20"):
        for metric in ("top1", "top5"):
            assert abs(reports["dali"]["k"][k][metric] - reports["torchvision"]["k"][k][metric]) <= 0.1, (k, metric)
    net, _ = load_backbone(Path(cfg.train.run_dir) / "backbone_resnet18.pth", None)
    accelerator = Accelerator(cpu=True)
    feats = {name: embed(net, build_eval_loader(name, str(tmp / "tinted" / "val"), EvalView(cfg.aug.global_size), 5,
                                                num_workers=1 if name == "dali" else 0), accelerator)
             for name in ("torchvision", "dali")}
    assert torch.equal(feats["dali"][1], feats["torchvision"][1])
    cosine = torch.nn.functional.cosine_similarity(feats["dali"][0], feats["torchvision"][0], dim=1)
    print(f"feature cosine similarity dali vs torchvision: min {cosine.min():.6f}")
    assert cosine.min() > 0.999


def test_eval_transform_resizes_bilinearly_as_the_authors(folder):
    """The authors' evaluation: Resize(256) bilinear, CentreCrop(224) (scaled to SIZE here)."""
    from torchvision import transforms as T

    from pipelines.eval import eval_transform
    from pipelines.folder import scan_image_folder

    path = scan_image_folder(folder)[0][0][0]
    img = Image.open(path).convert("RGB")
    authors = T.Compose([T.Resize(round(SIZE / 0.875), interpolation=T.InterpolationMode.BILINEAR),
                         T.CenterCrop(SIZE), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    bicubic = T.Compose([T.Resize(round(SIZE / 0.875), interpolation=T.InterpolationMode.BICUBIC),
                         T.CenterCrop(SIZE), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ours = eval_transform(EvalView(SIZE))(img)
    torch.testing.assert_close(ours, authors(img), rtol=0, atol=0)
    assert (ours - bicubic(img)).abs().max() > 1e-3  # the interpolation is visible on this image
    torch.testing.assert_close(eval_transform(EvalView(SIZE, "bicubic"))(img), bicubic(img), rtol=0, atol=0)


def test_the_cifar_recipe_evaluates_as_the_authors_cifar_transform(tmp_path):
    """ML-CPC's CIFAR-10 evaluation (main_lincls_cifar.py): ToTensor + Normalize with CIFAR-10's statistics of the
    32-px image, no resize or crop; what the CIFAR recipe's run gives its k-NN and the eval tools."""
    from torchvision import transforms as T

    from fastssl.config import eval_view
    from pipelines.eval import eval_transform

    view = eval_view(load_recipe("mlcpc_moco_cifar"))
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    authors = T.Compose([T.ToTensor(), T.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))])
    torch.testing.assert_close(eval_transform(view)(img), authors(img), rtol=0, atol=0)
    imagenet = replace(view, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert (eval_transform(imagenet)(img) - authors(img)).abs().mean() > 0.05  # the statistics are visible
    assert (eval_transform(replace(view, crop_fraction=0.875))(img) - authors(img)).abs().mean() > 0.1  # 37 + crop


@requires_dali
def test_dali_takes_the_crop_fraction_and_normalisation_as_pil_does(folder):
    view = EvalView(SIZE, crop_fraction=1.0, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))
    ref = read_all("torchvision", folder, view=view)
    got = read_all("dali", folder, view=view)
    assert (cat(ref, 0) - cat(got, 0)).abs().mean(dim=(1, 2, 3)).max() < MEAN_TOL
    imagenet = read_all("torchvision", folder, view=replace(view, mean=IMAGENET_MEAN, std=IMAGENET_STD))
    assert (cat(imagenet, 0) - cat(got, 0)).abs().mean() > 5 * MEAN_TOL  # the statistics are applied
    assert (cat(read_all("torchvision", folder), 0) - cat(got, 0)).abs().mean() > 5 * MEAN_TOL  # 0.875 too


@requires_dali
def test_the_online_knn_dali_loader_gets_the_runs_dali_options(tmp_path, monkeypatch):
    """`--data.dali_hw_decoder_load` reaches the DALI k-NN loaders' pipeline, as it does the training
    loader's, and so does the run's eval view (`--eval.interpolation`, `--eval.crop_fraction`, `--aug.mean`)."""
    import argparse

    import pipelines.dali_eval as de
    from fastssl.engine import build_knn
    from test_engine import tiny_config

    cfg = tiny_config(tmp_path, epochs=1)
    cfg.eval.loader, cfg.data.dali_hw_decoder_load, cfg.eval.interpolation = "dali", 0.3, "bicubic"
    cfg.eval.crop_fraction, cfg.aug.mean = 0.5, (0.5, 0.5, 0.5)
    accelerator = argparse.Namespace(device=torch.device("cpu"), num_processes=1, process_index=0)
    knn = build_knn(cfg, accelerator, 1)
    seen = []

    class Seen(Exception):
        pass

    def recording_pipeline(source, view, decoder_device, hw_decoder_load, layout, **kwargs):
        seen.append((hw_decoder_load, view))
        raise Seen

    monkeypatch.setattr(de, "eval_pipeline", recording_pipeline)
    for loader in (knn.bank, knn.queries):
        with pytest.raises(Seen):
            next(iter(loader))
    expected = EvalView(cfg.aug.global_size, "bicubic", 0.5, (0.5, 0.5, 0.5), IMAGENET_STD)
    assert seen == [(0.3, expected), (0.3, expected)]


def test_a_transforms_error_is_raised_not_taken_for_an_unreadable_image(folder):
    """LabelledImages caught any ValueError around the transform too: a bug skipped every image as unreadable."""
    from pipelines.eval import LabelledImages

    def broken(image: Image.Image) -> torch.Tensor:
        raise ValueError("a transform's bug")

    samples = [(str(p), 0) for p in sorted(Path(folder).rglob("*.JPEG"))[:2]]
    for seed in (None, 3):
        with pytest.raises(ValueError, match="a transform's bug"):
            LabelledImages(samples, broken, seed=seed)[(0, 1) if seed else 1]
    bad = Path(folder).parent / "bad.JPEG"
    bad.write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipping unreadable image .*bad.JPEG"):
        assert LabelledImages([(str(bad), 0)], broken)[0] is None  # the decode fails first: skipped
