"""Every image becomes the RGB picture the model should see."""

from __future__ import annotations

import numpy as np
from PIL import Image

from anemia_dist.images import load_rgb

BACKGROUND = (124, 116, 104)


def test_rgba_mask_is_composited_onto_the_fixed_background(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (10, 250, 10)  # garbage colour under the mask
    rgba[2:6, 2:6] = (200, 30, 40, 255)  # the visible crop
    Image.fromarray(rgba, "RGBA").save(tmp_path / "crop.png")
    rgb = np.asarray(load_rgb(tmp_path / "crop.png", BACKGROUND))
    assert rgb.shape == (8, 8, 3)
    assert tuple(rgb[0, 0]) == BACKGROUND
    assert tuple(rgb[3, 3]) == (200, 30, 40)


def test_half_transparent_pixels_blend_with_the_background(tmp_path):
    Image.new("RGBA", (2, 2), (200, 0, 0, 128)).save(tmp_path / "half.png")
    pixel = np.asarray(load_rgb(tmp_path / "half.png", (0, 0, 0)))[0, 0]
    assert abs(int(pixel[0]) - 100) <= 1 and pixel[1] == 0


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # white strip on the left
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    image.save(tmp_path / "phone.jpg", exif=exif)
    rgb = load_rgb(tmp_path / "phone.jpg", BACKGROUND)
    assert rgb.size == (20, 40)
    top = np.asarray(rgb)[:8].mean()
    assert top > 200, "the left strip is at the top after rotating clockwise"


def test_greyscale_cmyk_palette_and_16bit_become_rgb(tmp_path):
    Image.new("L", (4, 4), 90).save(tmp_path / "grey.png")
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("P", (4, 4), 3).save(tmp_path / "palette.png")
    Image.fromarray(np.array([[0, 65535], [32768, 1000]], np.uint16)).save(tmp_path / "deep.png")
    for name in ("grey.png", "cmyk.jpg", "palette.png", "deep.png"):
        rgb = load_rgb(tmp_path / name, BACKGROUND)
        assert rgb.mode == "RGB", name
    assert tuple(np.asarray(load_rgb(tmp_path / "grey.png", BACKGROUND))[0, 0]) == (90, 90, 90)
    red = np.asarray(load_rgb(tmp_path / "cmyk.jpg", BACKGROUND))[1, 1]
    assert red[0] > 200 and red[1] < 60
    deep = np.asarray(load_rgb(tmp_path / "deep.png", BACKGROUND))[..., 0]
    assert deep[0, 0] == 0 and deep[0, 1] == 255
