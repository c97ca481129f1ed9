"""The reference loader and the shared sampler: layout errors, shards, determinism, bad images."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import requires_dali, requires_ffcv, FILE_BACKENDS, data_path, decode_index, make_image_folder
from dist_utils import requires_gloo, run_distributed
from pipelines import DataConfig, LoaderSpec, LoaderUnavailable, MultiCropRecipe, build_train_loader
from pipelines.augment import IMAGENET_MEAN, IMAGENET_STD
from pipelines.folder import DataLayoutError, scan_image_folder
from pipelines.sampler import batches_per_epoch, shard_batches


def plain_recipe(**kw) -> MultiCropRecipe:
    """Crops only: no colour change, so a view's mean colour still names its source image."""
    return MultiCropRecipe(global_size=16, local_size=8, num_local=2, flip_p=0.5, jitter_p=0.0, grayscale_p=0.0,
                           blur_p=(0.0, 0.0, 0.0), solarize_p=(0.0, 0.0, 0.0), **kw)


def unnormalise_mean(view: torch.Tensor) -> list[int]:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((view.float().cpu() * std + mean) * 255).mean(dim=(1, 2)).round().int().tolist()


# Every training loader: the file backends, and DALI cropping only (the rest by pipelines.device_augment).
LOADERS = [*FILE_BACKENDS, pytest.param("dali-device-augment", marks=requires_dali)]
# On a GPU: DALI's mixed decoder, FFCV's device copy and device_augment, torchvision's device normalisation.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                  reason="needs a CUDA GPU")])]


def loader_spec(root, loader: str, device: str = "cpu", **kw) -> LoaderSpec:
    """`spec_for` of one of LOADERS, on `device`."""
    if loader == "dali-device-augment":
        loader, kw["device_augment"] = "dali", True
    return spec_for(root, backend=loader, device=torch.device(device), **kw)


# ------------------------------------------------------------------ folder scanning


def test_scan_maps_classes_like_imagefolder(image_folder):
    samples, classes = scan_image_folder(image_folder)
    assert classes == ["class_00", "class_01", "class_02"]
    assert len(samples) == 18 and samples[0][1] == 0 and samples[-1][1] == 2


@pytest.mark.parametrize("case, needle", [
    ("missing", "does not exist"),
    ("file", "is a file, not a folder"),
    ("empty", "has no class folders \\(it is empty\\)"),
    ("flat", "holds 2 images but no class folders"),
    ("empty_class", "has no images"),
    ("parent", "point at"),
])
def test_scan_errors_name_the_problem(tmp_path, case, needle):
    root = tmp_path / "data"
    if case == "file":
        root.write_text("x")
    elif case == "empty":
        root.mkdir()
    elif case == "flat":
        root.mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8)).save(root / f"{i}.JPEG")
    elif case == "empty_class":
        make_image_folder(root, 2, 2)
        (root / "class_zz").mkdir()
    elif case == "parent":
        make_image_folder(root / "train", 2, 2)
        make_image_folder(root / "val", 2, 2)
    with pytest.raises(DataLayoutError, match=needle) as err:
        scan_image_folder(root)
    assert "ImageNet layout" in str(err.value) or case in ("empty_class", "parent")


# ------------------------------------------------------------------ sharding


@pytest.mark.parametrize("n, batch, world", [(100, 8, 2), (37, 4, 3), (64, 8, 1)])
def test_shards_are_disjoint_and_cover_the_epoch(n, batch, world):
    shards = [sum(shard_batches(n, batch, r, world, seed=3, epoch=5), []) for r in range(world)]
    flat = sum(shards, [])
    assert len(flat) == len(set(flat))  # disjoint
    assert len(flat) == batches_per_epoch(n, batch, world) * batch * world
    assert n - len(flat) < batch * world  # only the remainder of the epoch is dropped
    assert all(len(s) == len(shards[0]) for s in shards)  # equal length: no rank waits


def test_order_depends_on_seed_and_epoch_only():
    a = shard_batches(50, 5, 0, 2, seed=1, epoch=0)
    assert a == shard_batches(50, 5, 0, 2, seed=1, epoch=0)
    assert a != shard_batches(50, 5, 0, 2, seed=1, epoch=1)
    assert a != shard_batches(50, 5, 0, 2, seed=2, epoch=0)
    assert shard_batches(50, 5, 0, 2, seed=1, epoch=0, start_batch=2) == a[2:]


def test_too_small_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        shard_batches(10, 8, 0, 2, seed=0, epoch=0)


# ------------------------------------------------------------------ the torchvision loader


SPEC_FIELDS = {f.name for f in dataclasses.fields(LoaderSpec)}


def spec_for(root, recipe=None, backend: str = "torchvision", **kw) -> LoaderSpec:
    """`backend`'s spec for this image folder; `kw` sets LoaderSpec fields, or else DataConfig fields."""
    kw.setdefault("batch_size", 4)
    data = DataConfig(backend=backend, train=data_path(backend, root),
                      **{k: v for k, v in kw.items() if k not in SPEC_FIELDS})
    return LoaderSpec(data=data, recipe=recipe or plain_recipe(), **{k: v for k, v in kw.items() if k in SPEC_FIELDS})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loader", LOADERS)
def test_batches_have_the_contract_shapes(image_folder, loader, device):
    loader = build_train_loader(loader_spec(image_folder, loader, device))
    batches = list(loader)
    assert len(batches) == len(loader) == 4
    b = batches[0]
    assert [tuple(v.shape) for v in b.views] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 2
    assert all(v.is_contiguous(memory_format=torch.channels_last) for v in b.views)
    assert all(v.device.type == device and v.dtype == torch.float32 for v in b.views)
    assert b.label.tolist() == [i // 6 for i in b.index.tolist()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loader", LOADERS)
def test_every_view_comes_from_its_source_image(image_folder, loader, device):
    loader = build_train_loader(loader_spec(image_folder, loader, device))
    for batch in loader:
        for row, index in enumerate(batch.index.tolist()):
            for view in batch.views:
                assert decode_index(unnormalise_mean(view[row])) == index


@requires_dali
def test_dali_cpu_can_keep_the_gpu_resampling(image_folder):
    """`dali_cpu_fast=False`: bicubic crops and the accurate IDCT on CPU, as on a GPU."""
    loader = build_train_loader(spec_for(image_folder, backend="dali", dali_cpu_fast=False))
    for batch in loader:
        for row, index in enumerate(batch.index.tolist()):
            for view in batch.views:
                assert decode_index(unnormalise_mean(view[row])) == index


@requires_dali
@pytest.mark.parametrize("cpu_fast", [True, False], ids=["numba-steps", "conditionals"])
def test_dali_augmentations_repeat_from_the_seed_whatever_the_threads(image_folder, cpu_fast):
    """Every draw is a DALI random op seeded by the pipeline: 1 or 2 threads, the same views.

    The recipe has empty ranges (hue 0, one blur sigma), which DALI's uniform refuses.
    """
    recipe = MultiCropRecipe(global_size=16, local_size=8, num_local=2, jitter=(0.4, 0.4, 0.2, 0.0),
                             blur_sigma=(1.0, 1.0), solarize_p=(0.5, 0.5, 0.5))
    runs = []
    for threads in (1, 2):
        loader = build_train_loader(spec_for(image_folder, recipe, backend="dali", num_workers=threads,
                                                     seed=4, dali_cpu_fast=cpu_fast))
        loader.set_epoch(1)
        runs.append(list(loader))
    for a, b in zip(*runs):
        assert torch.equal(a.index, b.index)
        for va, vb in zip(a.views, b.views):
            torch.testing.assert_close(va, vb, rtol=0, atol=0)
    assert not torch.equal(runs[0][0].views[2], runs[0][0].views[3])  # the views do differ


def test_read_ahead_gives_one_by_one_results_from_concurrent_reads():
    """`ReadAhead`: results and a read's exception arrive in item order, as reading one by one gives
    them, while up to `depth` reads run at once (the barrier breaks unless 4 wait together)."""
    import threading
    import time

    from pipelines.images import ReadAhead

    together = threading.Barrier(4, timeout=30)
    rng = np.random.default_rng(0)
    delays = rng.uniform(0, 0.004, size=60)

    def read(i: int) -> int:
        if i < 4:
            together.wait()  # BrokenBarrierError (raised at item 0) unless 4 reads are in flight at once
        time.sleep(delays[i])  # uneven: later items often finish first
        if i == 50:
            raise ValueError("item 50")
        return i * i

    reads = ReadAhead(read, range(60), depth=8, threads=8)  # a task per item: the first 4 meet at the barrier
    got = [next(reads) for _ in range(50)]
    assert got == [i * i for i in range(50)]
    with pytest.raises(ValueError, match="item 50"):
        next(reads)
    assert not any(t.name.startswith("fastssl-read") for t in threading.enumerate())  # closed by the failure
    for chunk in (3, 7):  # several items per task, the failure inside one
        together = threading.Barrier(1)
        reads = ReadAhead(read, range(60), depth=14, threads=4, chunk=chunk)
        assert [next(reads) for _ in range(50)] == [i * i for i in range(50)]
        with pytest.raises(ValueError, match="item 50"):
            next(reads)
    one_by_one = ReadAhead(lambda i: i + 1, range(5), depth=8, threads=1)
    assert list(one_by_one) == [1, 2, 3, 4, 5]


@requires_dali
@pytest.mark.parametrize("stop_early", [False, True], ids=["whole-epoch", "stopped-mid-epoch"])
def test_dali_reader_threads_end_with_the_pass(image_folder, stop_early):
    """The DALI source's reader threads stop when its pass ends or is stopped, so none is left
    running when a later DataLoader forks its workers (or the process exits)."""
    import threading

    def readers() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("fastssl-read")]

    loader = build_train_loader(spec_for(image_folder, backend="dali", batch_size=2))
    it = iter(loader)
    next(it)
    assert readers()  # reading ahead while the pass runs
    if stop_early:
        it.close()
    else:
        assert len(list(it)) == len(loader) - 1
    assert readers() == []


@requires_ffcv
def test_ffcv_epoch_thread_stops_when_the_caller_stops_early(image_folder):
    """FFCV's epoch thread outliving its epoch made processes abort at exit (code 134)."""
    loader = build_train_loader(spec_for(image_folder, backend="ffcv", batch_size=2))
    it = iter(loader)
    next(it)
    epoch_thread = loader._epoch_it
    assert epoch_thread.is_alive()  # 9 batches in the epoch, 1 read: FFCV is still decoding ahead
    it.close()
    assert not epoch_thread.is_alive()
    assert len(list(loader)) == len(loader)  # and the next epoch runs whole


@requires_ffcv
def test_ffcv_stop_does_not_hang_on_the_end_of_epoch_marker(image_folder, monkeypatch):
    """Stopping when FFCV has queued every remaining batch: its end marker's put blocks with
    no timeout, so only emptying the queue lets the thread end."""
    import time
    import warnings

    import pipelines.ffcv as pf

    monkeypatch.setattr(pf, "EPOCH_THREAD_JOIN_S", 5.0)
    loader = build_train_loader(spec_for(image_folder, backend="ffcv", batch_size=2))
    it = iter(loader)
    next(it)
    ahead = loader._loader.batches_ahead  # the queue's size
    for _ in range(len(loader) - ahead - 1):  # leave exactly a full queue unread
        next(it)
    epoch_thread = loader._epoch_it
    time.sleep(1.0)  # the thread decodes the rest and blocks on its end-of-epoch marker
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "did not stop within" would fail here
        it.close()
    assert not epoch_thread.is_alive()


def test_augmentations_do_not_depend_on_workers(image_folder):
    full = MultiCropRecipe(global_size=16, local_size=8, num_local=2)
    runs = []
    for workers in (0, 2):
        loader = build_train_loader(spec_for(image_folder, full, num_workers=workers, seed=4))
        loader.set_epoch(1)
        runs.append(list(loader))
    for a, b in zip(*runs):
        assert torch.equal(a.index, b.index)
        for va, vb in zip(a.views, b.views):
            torch.testing.assert_close(va, vb)


def test_resume_mid_epoch_replays_the_rest(image_folder):
    loader = build_train_loader(spec_for(image_folder, seed=9))
    loader.set_epoch(2)
    whole = list(loader)
    loader.set_epoch(2, start_batch=3)
    rest = list(loader)
    assert len(rest) == 1 and torch.equal(rest[0].index, whole[3].index)
    torch.testing.assert_close(rest[0].views[2], whole[3].views[2])


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_resume_continues_the_data_order(image_folder, backend):
    loader = build_train_loader(spec_for(image_folder, backend=backend, seed=9))
    loader.set_epoch(2)
    whole = [b.index for b in loader]
    resumed = build_train_loader(spec_for(image_folder, backend=backend, seed=9))
    resumed.set_epoch(2, start_batch=1)  # a resumed run's FIRST iteration starts mid-epoch
    rest = [b.index for b in resumed]
    assert len(rest) == len(whole) - 1
    assert all(torch.equal(a, b) for a, b in zip(rest, whole[1:]))
    resumed.set_epoch(3)  # ... and the next epoch is whole again, in a new order
    following = [b.index for b in resumed]
    assert len(following) == len(whole) == len(resumed)
    assert not all(torch.equal(a, b) for a, b in zip(following, whole))


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_odd_and_broken_images_are_decoded_or_skipped(tmp_path, backend):
    root = tmp_path / "train"
    make_image_folder(root, 2, 4)
    odd = root / "class_00"
    Image.new("CMYK", (30, 30), (10, 20, 30, 0)).save(odd / "cmyk.JPEG")
    Image.new("L", (30, 30), 128).save(odd / "gray.JPEG")
    Image.new("RGBA", (30, 30)).save(odd / "png_named.JPEG", format="PNG")
    good = (odd / "img_000.JPEG").read_bytes()
    (odd / "truncated.JPEG").write_bytes(good[: len(good) // 3])
    # Starts and ends like a JPEG, so only a decoder can tell: DALI's pipeline fails on it.
    (odd / "bad_header.JPEG").write_bytes(good[:4] + bytes(200) + good[204:])
    (odd / "not_an_image.JPEG").write_text("hello")
    Image.new("RGB", (3, 2), (200, 10, 10)).save(odd / "smaller_than_a_crop.JPEG")
    if backend == "ffcv":  # the converter skips and reports; the .beton holds only good images
        spec = LoaderSpec(data=DataConfig(backend=backend, train=data_path(backend, root, write_mode="jpg")),
                          recipe=plain_recipe(), batch_size=12)
        summary = json.loads(Path(spec.path + ".json").read_text())
        assert sorted(Path(s["path"]).name for s in summary["skipped"]) == \
            ["bad_header.JPEG", "not_an_image.JPEG", "truncated.JPEG"]
        batches = list(build_train_loader(spec))
        assert len({i for b in batches for i in b.index.tolist()}) == 12
        assert all(torch.isfinite(v).all() for b in batches for v in b.views)
        return
    loader = build_train_loader(spec_for(root, backend=backend, batch_size=15))
    with pytest.warns(UserWarning, match="skipping"):
        batches = list(loader)
    assert sum(b.num_skipped for b in batches) == 3
    assert all(torch.isfinite(v).all() for b in batches for v in b.views)
    assert batches[0].batch_size == 15  # replaced, so the batch keeps its size
    # Nothing is lost: every readable image (8 plain + CMYK, gray, PNG, tiny) is seen.
    assert len({i for b in batches for i in b.index.tolist()}) == 12


def test_unknown_backend_is_named(image_folder):
    with pytest.raises(LoaderUnavailable, match="unknown data backend 'nope'"):
        build_train_loader(spec_for(image_folder, backend="nope"))


def test_a_missing_package_is_a_user_error_but_a_broken_import_of_ours_is_not(monkeypatch):
    """An ImportError naming a package outside fastssl is the user's to fix (install it): LoaderUnavailable,
    exit 2. One naming our own modules is a bug: it propagates with its traceback, not as "install DALI"."""
    import importlib

    from pipelines import spec

    def failing_import(name: str):
        raise ImportError(f"no {missing}", name=missing)

    monkeypatch.setattr(importlib, "import_module", failing_import)
    for missing in ("nvidia.dali", "ffcv.loader"):
        with pytest.raises(LoaderUnavailable, match="is not available"):
            spec.registered_class(spec.BACKENDS, "dali", "data backend", "pick --data.backend torchvision")
    for missing in ("pipelines.images", "fastssl.ops"):
        with pytest.raises(ImportError) as err:
            spec.registered_class(spec.BACKENDS, "dali", "data backend", "pick --data.backend torchvision")
        assert not isinstance(err.value, LoaderUnavailable) and err.value.name == missing


def test_auto_backend_is_dali_only_on_a_gpu_with_dali(monkeypatch):
    import importlib.util
    import sys

    from pipelines import resolve_backend

    assert resolve_backend("ffcv", torch.device("cuda")) == ("ffcv", None)  # a named backend stays
    name, why = resolve_backend("auto", torch.device("cpu"))
    assert name == "torchvision" and "no CUDA device" in why
    try:
        dali_here = importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no `nvidia` package at all
        dali_here = False
    if dali_here:
        assert resolve_backend("auto", torch.device("cuda", 1))[0] == "dali"  # resolving touches no GPU
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if not installed: its import fails
    name, why = resolve_backend("auto", torch.device("cuda", 1))
    assert name == "torchvision" and "`rm -f .venv/.fastssl-installed && make setup`" in why


def test_auto_is_a_valid_backend_name_but_not_a_loader(image_folder):
    assert DataConfig(backend="auto", train="x").errors() == []
    assert "or auto" in DataConfig(backend="nope", train="x").errors()[0]
    with pytest.raises(LoaderUnavailable, match="unknown data backend 'auto'"):  # resolved before any loader is built
        build_train_loader(spec_for(image_folder, backend="auto"))


def test_synthetic_backend_shapes():
    spec = LoaderSpec(data=DataConfig(backend="synthetic", synthetic_size=12), recipe=plain_recipe(), batch_size=3)
    loader = build_train_loader(spec)
    batches = list(loader)
    assert len(batches) == 4
    assert [tuple(v.shape) for v in batches[0].views] == [(3, 3, 16, 16)] * 2 + [(3, 3, 8, 8)] * 2
    assert not torch.equal(batches[0].views[0], batches[1].views[0])
    assert np.isfinite(batches[0].views[0].numpy()).all()


@pytest.mark.parametrize("backend", [*FILE_BACKENDS, "synthetic"])
def test_loaders_refuse_data_smaller_than_one_global_batch(image_folder, backend):
    spec = spec_for(image_folder, backend=backend, batch_size=10, world_size=2, synthetic_size=18)
    from pipelines.folder import DataLayoutError

    with pytest.raises(DataLayoutError, match="fewer than one global batch of 20"):  # a user error: exit 2
        build_train_loader(spec)


def _shard_indices(rank: int, world_size: int, backend: str, path: str) -> list[int]:
    """In a real process of a 2-process gloo group: this rank's indices of epoch 1."""
    import torch.distributed as dist

    spec = LoaderSpec(data=DataConfig(backend=backend, train=path), recipe=plain_recipe(), batch_size=3,
                      rank=dist.get_rank(), world_size=dist.get_world_size(), seed=5)
    loader = build_train_loader(spec)
    loader.set_epoch(1)
    return [i for b in loader for i in b.index.tolist()]


@requires_gloo
@pytest.mark.slow
@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_two_processes_get_disjoint_shards_that_cover_the_epoch(image_folder, backend):
    path = data_path(backend, image_folder)
    shards = run_distributed(_shard_indices, world_size=2, args=(backend, path), timeout=300)
    assert len(shards[0]) == len(shards[1]) == 9  # 18 images = 2 ranks x 3 batches of 3
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(18))


@requires_dali
def test_dali_cpu_falls_back_to_its_operators_when_numba_steps_cannot_be_built(image_folder, monkeypatch):
    """A numba/DALI mismatch costs speed, not the run: one warning, the conditional graph."""
    import pipelines.dali_photometric as dp

    def broken(*args, **kwargs):
        raise TypeError("numba plugin says no")

    monkeypatch.setattr(dp, "NumbaFunction", broken)
    monkeypatch.setattr(dp, "_OPERATOR", None)
    monkeypatch.setattr(dp, "_UNAVAILABLE", None)
    with pytest.warns(UserWarning, match="could not be built.*numba plugin says no.*conditionals"):
        loader = build_train_loader(spec_for(image_folder, MultiCropRecipe(global_size=16, local_size=8,
                                                                                   num_local=2), backend="dali"))
        batches = list(loader)
    assert len(batches) == len(loader)
    assert [tuple(v.shape) for v in batches[0].views] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 2
    assert all(torch.isfinite(v).all() for b in batches for v in b.views)
    assert not dp.available()  # decided once per process: no second build, no second warning


# ------------------------------------------------------------------ one data config, backends apart


def test_the_loop_hands_the_data_config_to_the_loader_whole():
    """A data option reaches the loader without a field-by-field copy (`engine.loader_spec`)."""
    import argparse

    from fastssl.config import Config
    from fastssl.engine import loader_spec

    cfg = Config()
    cfg.data.backend, cfg.data.synthetic_size, cfg.data.synthetic_classes = "synthetic", 24, 3
    cfg.aug, cfg.train.global_batch_size = plain_recipe(), 4
    accelerator = argparse.Namespace(device=torch.device("cpu"), num_processes=2, process_index=1,
                                     mixed_precision="no")
    loader = build_train_loader(loader_spec(cfg, accelerator, 0))
    assert loader.spec.data is cfg.data and loader.spec.path == cfg.data.train
    assert (loader.spec.rank, loader.spec.world_size, loader.spec.batch_size) == (1, 2, 2)
    assert len(loader) == 6  # 24 images / 2 ranks / batches of 2
    assert all(0 <= label < 3 for b in loader for label in b.label.tolist())


def _pipelines_imports(path: Path) -> set[str]:
    """The `pipelines.*` modules a source file imports, anywhere in it (also inside functions)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.startswith("pipelines.")}


def test_no_backend_imports_another_backend():
    """Backends share image I/O through `pipelines.images`, not through each other."""
    from pipelines.spec import BACKENDS, EVAL_BACKENDS

    backends = {target.split(":")[0] for target in [*BACKENDS.values(), *EVAL_BACKENDS.values()]}
    backends.add("pipelines.beton_writer")  # the converter's workers
    repo = Path(__file__).resolve().parents[1]
    for module in sorted(backends):
        imported = _pipelines_imports(repo / (module.replace(".", "/") + ".py"))
        assert not imported & (backends - {module}), f"{module} imports {sorted(imported & backends)}"
        reads_image_files = module not in ("pipelines.synthetic", "pipelines.ffcv")  # ffcv: the converter did
        assert ("pipelines.images" in imported) == reads_image_files, module


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_torchvision_crops_resample_with_the_recipes_interpolation(interpolation):
    """`aug.interpolation` reaches the crop: equal to torchvision's RandomResizedCrop with that
    filter under the same seed, and unlike the other filter (MoCo's recipes ask for bilinear)."""
    from torchvision import transforms as T

    from pipelines.torchvision import view_transform

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
    recipe = MultiCropRecipe(global_size=24, interpolation=interpolation)
    view = recipe.view(0)
    crops = {}
    for mode in ("bicubic", "bilinear"):
        torch.manual_seed(3)
        reference = T.RandomResizedCrop(view.size, scale=view.scale, ratio=recipe.ratio,
                                        interpolation=getattr(T.InterpolationMode, mode.upper()))
        crops[mode] = T.PILToTensor()(reference(img))
    torch.manual_seed(3)
    ours = view_transform(recipe, view, photometric=False)(img)
    assert torch.equal(ours, crops[interpolation])
    assert not torch.equal(crops["bicubic"], crops["bilinear"])


def test_torchvision_views_are_the_whole_torchvision_chain_normalised_where_they_land(image_folder, monkeypatch):
    """Workers hand over uint8 crops (a quarter of float32's bytes to the GPU); normalised on the
    training device they equal, bit for bit, the recipe's transforms ending in ToTensor + Normalize."""
    from torchvision import transforms as T

    import pipelines.torchvision as tv
    from pipelines.sampler import sample_rng

    recipe = MultiCropRecipe(global_size=16, local_size=8, num_local=2)  # every photometric step on
    handed = []
    to_device = LoaderSpec.to_device
    monkeypatch.setattr(LoaderSpec, "to_device", lambda self, x: handed.append(x.dtype) or to_device(self, x))
    real_normalize = tv.normalize_uint8
    monkeypatch.setattr(tv, "normalize_uint8", lambda x, *a: handed.append(x.dtype) or real_normalize(x, *a))
    loader = build_train_loader(spec_for(image_folder, recipe=recipe, batch_size=3, seed=5))
    batch = next(iter(loader))
    assert set(handed[:recipe.num_views]) == {torch.uint8}  # what crossed from the workers
    dataset = tv.MultiCropFolder(image_folder, recipe, seed=5)
    whole = [T.Compose([*t.transforms[:-1], T.ToTensor(), T.Normalize(recipe.mean, recipe.std)])
             for t in dataset.transforms]
    for row, i in enumerate(batch.index.tolist()):
        img = dataset._read(i)
        with sample_rng(5, 0, i):
            expected = [t(img) for t in whole]
        for v, want in enumerate(expected):
            assert torch.equal(batch.views[v][row], want), (row, v)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_normalising_on_the_gpu_is_totensor_and_normalize_bit_for_bit():
    """CUDA divides by a host scalar as a product with its reciprocal (one bit off for half the byte values):
    the 255 is a device tensor, so every byte value normalises as torchvision's CPU chain does."""
    from torchvision import transforms as T

    from pipelines.device_augment import normalize_uint8

    recipe = MultiCropRecipe()
    x = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(1, 3, 16, 16)
    want = T.Normalize(recipe.mean, recipe.std)(x[0].float().div(255))
    got = normalize_uint8(x.cuda(), recipe)[0].cpu()
    assert torch.equal(got, want)


def test_a_sample_reseeds_the_cpu_generator_only_and_restores_it(tmp_path, monkeypatch):
    """In the main process (num_workers 0) on a GPU, `torch.manual_seed` would also reseed every
    CUDA generator per sample, and fork_rng(devices=[]) would not restore them."""
    from pipelines.torchvision import MultiCropFolder

    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    make_image_folder(tmp_path / "imgs")
    data = MultiCropFolder(str(tmp_path / "imgs"), MultiCropRecipe(global_size=16, local_size=8, num_local=2), seed=3)
    before = torch.get_rng_state()
    first, again = data[(0, 1)], data[(0, 1)]
    assert reseeded == [] and torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(first[0], again[0]))  # a function of (seed, epoch, image)


START_METHODS_SCRIPT = '''
import multiprocessing
import sys

import torch

from pipelines import DataConfig, LoaderSpec, MultiCropRecipe, build_train_loader
from pipelines.augment import EvalView
from pipelines.eval import EvalLoader


def read(root, method, workers):
    """Epoch 1 of the training loader and the evaluation loader, workers started by `method`."""
    multiprocessing.set_start_method(method, force=True)
    recipe = MultiCropRecipe(global_size=16, local_size=8, num_local=2)
    spec = LoaderSpec(data=DataConfig(backend="torchvision", train=root), recipe=recipe, batch_size=4, seed=4,
                      num_workers=workers)
    loader = build_train_loader(spec)
    loader.set_epoch(1)
    train = [(b.index, *b.views) for b in loader]
    return train, [(x, y) for x, y, _ in EvalLoader(root, EvalView(16), 4, num_workers=workers)]


if __name__ == "__main__":  # forkserver workers import this script: nothing may run then
    reference = read(sys.argv[1], "fork", 0)
    for method in ("forkserver",):
        for ours, theirs in zip(read(sys.argv[1], method, 2), reference):
            assert len(ours) == len(theirs) > 0
            for a, b in zip(ours, theirs):
                for x, y in zip(a, b):
                    torch.testing.assert_close(x, y, atol=0, rtol=0)
        print(method, "equal", flush=True)
'''


@pytest.mark.slow
def test_loader_workers_started_by_forkserver_deliver_the_same_batches(image_folder, tmp_path):
    """Python 3.14 starts DataLoader workers by forkserver on Linux, which pickles the dataset and
    imports the main script in each worker: the loaders' datasets, collate and worker set-up must
    survive that and give the batches of the training process itself."""
    import subprocess
    import sys

    script = tmp_path / "start_methods.py"
    script.write_text(START_METHODS_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(image_folder)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[0] == "forkserver equal", done.stdout
