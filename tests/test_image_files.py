"""Image files as the loaders read them (`pipelines.images`, `pipelines.folder`): every backend must see
the same pixels of the same files. Deep images scaled as DALI scales them, the formats the byte screen
knows, bytes after an image's end, EXIF orientation, and a class folder's link that points nowhere."""

from __future__ import annotations

import io
import re
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_image_folder, requires_dali
from pipelines.augment import MultiCropRecipe
from pipelines.images import ANY_FORMAT, DALI_FORMATS, decode_for_conversion, load_rgb, problem

RAMP16 = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_a_16_bit_grey_image_keeps_its_tones(tmp_path: Path, fmt: str) -> None:
    """PIL's convert("RGB") clipped 16-bit values to 255 (99.6% of a ramp came out white); DALI keeps the
    high byte. Both PIL paths (the torchvision loaders, the converter) now do as DALI does."""
    path = tmp_path / f"ramp.{fmt.lower()}"
    path.write_bytes(encoded(Image.fromarray(RAMP16), fmt))
    expected = (RAMP16.astype(np.float64) / 256).astype(np.uint8)
    for pixels in (np.asarray(load_rgb(str(path))), decode_for_conversion(str(path))[0]):
        assert pixels.shape == (64, 64, 3) and (pixels == expected[..., None]).all()


def test_a_float_grey_image_in_0_to_1_is_scaled_to_8_bits(tmp_path: Path) -> None:
    ramp = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    path = tmp_path / "ramp.tif"
    path.write_bytes(encoded(Image.fromarray(ramp), "TIFF"))
    pixels = np.asarray(load_rgb(str(path)))[..., 0].astype(np.float64)
    assert np.abs(pixels - ramp * 255).max() <= 1.0  # was all 0 (black) or 1


def test_the_screen_names_formats_dali_cannot_decode_and_passes_the_rest() -> None:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    files = {"gif": encoded(rgb, "GIF"), "pnm": encoded(rgb, "PPM"), "jpeg2000": encoded(rgb, "JPEG2000"),
             "ico": encoded(rgb, "ICO"), "pgm": encoded(rgb.convert("L"), "PPM")}
    for name in ("pnm", "pgm", "jpeg2000"):
        assert problem(files[name]) is None, name  # DALI decodes them: they were "not an image"
    for name in ("gif", "ico"):
        assert problem(files[name]) == (f"a {name.upper()} image, which DALI does not decode: convert it to JPEG "
                                        f"or PNG, or train with --data.backend torchvision")
        assert problem(files[name], ANY_FORMAT) is None  # the converter decodes them with PIL
    assert DALI_FORMATS < ANY_FORMAT


def test_bytes_after_an_images_end_are_not_truncation_but_a_cut_still_is() -> None:
    """Phones append a video after a JPEG's end ("motion photos"), writers pad: the end marker was looked for
    in the last 64 bytes only, and such files were skipped as truncated by DALI and the converter."""
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    for fmt, says in (("JPEG", "truncated JPEG"), ("PNG", "truncated PNG")):
        whole = encoded(rgb, fmt)
        assert problem(whole + bytes(200)) is None and problem(whole + os.urandom(5000)) is None, fmt
        assert problem(whole[: len(whole) * 2 // 3]).startswith(says), fmt


def rotated_folder(root: Path) -> Path:
    """2 classes x 4 images, 96 x 64, top half white, bottom black, each tagged "rotate 90 degrees" in EXIF."""
    pixels = np.zeros((64, 96, 3), dtype=np.uint8)
    pixels[:32] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer turns it 90 degrees clockwise
    for c in range(2):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i}.jpg", quality=95, exif=exif)
    return root


@pytest.mark.parametrize("backend", ["torchvision", pytest.param("dali", marks=requires_dali)])
def test_every_backend_ignores_exif_orientation_as_pil_does(tmp_path: Path, backend: str) -> None:
    """DALI's training decoder turned photos by their EXIF tag where PIL (torchvision, the converter, so FFCV)
    and the DALI evaluation do not: the same image trained upright in one backend and on its side in another.
    FFCV trains on the converter's pixels (`decode_for_conversion`), checked directly: its loader adds 9 s."""
    from test_pipelines import spec_for

    from pipelines import build_train_loader

    pixels, _ = decode_for_conversion(str(next(rotated_folder(tmp_path / "converted").rglob("*.jpg"))))
    assert pixels.shape == (64, 96, 3) and pixels[:4].mean() > 250 > 5 > pixels[-4:].mean()
    recipe = MultiCropRecipe(global_size=16, local_size=8, num_local=0, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                             blur_p=(0.0, 0.0, 0.0), solarize_p=(0.0, 0.0, 0.0), global_scale=(0.9, 1.0))
    loader = build_train_loader(spec_for(rotated_folder(tmp_path / "train"), recipe, backend=backend))
    for batch in loader:
        for view in batch.views:
            top, bottom = view[:, :, :4].mean().item(), view[:, :, -4:].mean().item()
            left, right = view[:, :, :, :4].mean().item(), view[:, :, :, -4:].mean().item()
            assert top - bottom > 2.5 and abs(left - right) < 0.5, (backend, top, bottom, left, right)


def test_a_class_folder_link_that_points_nowhere_is_refused_not_dropped(tmp_path: Path) -> None:
    """A link to an unmounted disk made its class vanish and the classes after it take its label."""
    from pipelines.beton_convert import UsageError, scan_class_folders
    from pipelines.folder import DataLayoutError, scan_image_folder

    root = tmp_path / "train"
    make_image_folder(root, num_classes=2, per_class=2)
    os.symlink(tmp_path / "unmounted" / "class_01b", root / "class_01b")
    with pytest.raises(DataLayoutError, match=r"class_01b' is a link to .*unmounted/class_01b', which does not "
                                              r"exist \(an unmounted disk\?\)"):
        scan_image_folder(root)
    with pytest.raises(UsageError, match="which does not exist"):
        scan_class_folders(root)
    (root / "class_01b").unlink()
    os.symlink(root / "class_01", root / "class_01b")  # a link that works is a class like any other
    assert scan_image_folder(root)[1] == ["class_00", "class_01", "class_01b"]


def test_an_image_above_pils_size_limit_is_skipped_with_the_limit_and_how_to_lift_it(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    """It was skipped as "unreadable ... could be decompression bomb DOS attack", while DALI trains on it."""
    from pipelines.eval import LabelledImages

    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((40, 48, 3), dtype=np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1,920 pixels is past twice the limit: PIL refuses
    says = "larger than PIL's limit of 100 pixels x 2 (its guard against decompression bombs; DALI has none)"
    assert decode_for_conversion(str(path)) == (None, f"undecodable: {says}: shrink it, or raise "
                                                      f"PIL.Image.MAX_IMAGE_PIXELS in your recipe")
    with pytest.warns(UserWarning, match=rf"skipping unreadable image .*big.png: {re.escape(says)}"):
        assert LabelledImages([(str(path), 0)], lambda image: image)[0] is None


def test_the_next_readable_image_is_looked_for_once_per_file_and_a_broken_folder_is_named() -> None:
    """A bad training image is replaced by the next good one, wrapping around the dataset; a small folder
    of bad files is tried once each (not 16 times over) and said to be all unreadable; in a large one,
    16 bad files in a row are the limit, named from the first to the last."""
    from pipelines.folder import DataLayoutError
    from pipelines.images import MAX_REPLACEMENTS, next_readable

    samples = [(f"x{i}.JPEG", 0) for i in range(5)]
    tried: list[int] = []

    def read(i: int) -> str | None:
        tried.append(i)
        return f"image {i}" if i == 1 else None

    assert next_readable(samples, 3, read) == ("image 1", 1, [3, 4, 0]) and tried == [3, 4, 0, 1]
    tried.clear()
    with pytest.raises(DataLayoutError, match=r"^all 3 images are unreadable \(each named"):
        next_readable(samples[:3], 2, lambda i: tried.append(i))
    assert tried == [2, 0, 1]
    many = [(f"x{i}.JPEG", 0) for i in range(40)]
    with pytest.raises(DataLayoutError, match=rf"^{MAX_REPLACEMENTS} unreadable images in a row, from x5.JPEG to "
                                              rf"x{5 + MAX_REPLACEMENTS - 1}.JPEG"):
        next_readable(many, 5, lambda i: None)
