"""The ImageNet-like JPEGs (and their FFCV .beton) that the loaders and end_to_end stages read:
made once per scratch folder, on the machine's local disk outside the checkout, by a process pool
(1,500 of about 500 x 375 on a GPU run).
"""

from __future__ import annotations

import json
import shutil
import time

from pipelines.cores import usable_cores
from fastssl.gpu_check.runner import PY, Context


def _photo(job: tuple[int, int, int, str, int]) -> None:
    """One ImageNet-like JPEG: 1/f colour noise (photographic entropy and file size)."""
    import numpy as np
    from PIL import Image

    i, w, h, path, quality = job
    rng = np.random.default_rng(i)
    w, h = w + int(rng.integers(-w // 25, w // 25 + 1)), h + int(rng.integers(-h // 25, h // 25 + 1))
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(h, w))
    phase = rng.uniform(0, 2 * np.pi, (3, h, w // 2 + 1))
    img = np.fft.irfft2(amplitude * np.exp(1j * phase), s=(h, w))
    img = (img - img.mean(axis=(1, 2), keepdims=True)) / img.std(axis=(1, 2), keepdims=True)
    Image.fromarray(np.clip(128 + 45 * img.transpose(1, 2, 0), 0, 255).astype(np.uint8)).save(path, quality=quality)


def importable(module: str) -> bool:
    """Whether `module` can be found (without importing it: DALI and FFCV imports take seconds)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def dataset_spec(dry_run: bool) -> dict:
    return {"count": 24, "width": 64, "height": 48, "quality": 90, "classes": 4} if dry_run else \
        {"count": 1500, "width": 500, "height": 375, "quality": 90, "classes": 10}


def ensure_dataset(ctx: Context) -> dict:
    """The JPEG folder (ImageNet layout) and its .beton under the scratch dir, made once per machine."""
    spec = dataset_spec(ctx.dry_run)
    root = ctx.scratch / f"photo_{spec['count']}_{spec['width']}x{spec['height']}"
    train, beton = root / "train", root / "train.beton"
    info = {"train": str(train), "beton": str(beton), **spec}
    done = root / ".complete"
    if not done.exists():
        from concurrent.futures import ProcessPoolExecutor

        shutil.rmtree(root, ignore_errors=True)
        t = time.monotonic()
        jobs = []
        for i in range(spec["count"]):
            folder = train / f"n{i % spec['classes']:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((i, spec["width"], spec["height"], str(folder / f"img_{i:05d}.JPEG"), spec["quality"]))
        import multiprocessing

        # spawn: the parent may have initialised CUDA (torch.cuda.is_available); the workers need only PIL
        with ProcessPoolExecutor(max_workers=min(16, usable_cores()),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_photo, jobs, chunksize=8))
        info["generate_s"] = time.monotonic() - t
        if not importable("ffcv"):
            ctx.errors.append("FFCV is not importable: no .beton (the ffcv loader is skipped)")
            return {**info, "beton_exists": False}
        c = ctx.run("convert_ffcv", [PY, "tools/convert_imagenet_to_ffcv.py", str(train), str(beton),
                                     "--write-mode", "jpg", "--no-progress", "--force"], timeout=ctx.share(3))
        if c.rc != 0:
            ctx.errors.append(f"FFCV conversion: {'timed out' if c.timed_out else f'rc {c.rc}'}")
        else:
            done.write_text(json.dumps(info))
        info["convert_s"] = c.seconds
    else:
        info.update(json.loads(done.read_text()))
        info["reused"] = True
    files = list(train.rglob("*.JPEG"))
    info["mean_file_kb"] = sum(f.stat().st_size for f in files) / max(len(files), 1) / 1024
    info["beton_exists"] = beton.exists()
    return info
