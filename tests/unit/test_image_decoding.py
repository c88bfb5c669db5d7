"""Every image becomes the RGB picture the model should see."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import display_p3_profile, reddish_picture, save_as_display_p3
from PIL import Image, ImageCms

from anemia_dist.images import IMAGE_EXTENSIONS, ColourError, load_rgb

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


def test_a_display_p3_photo_decodes_to_the_same_colours_as_its_srgb_original(tmp_path):
    picture = reddish_picture()
    picture.save(tmp_path / "srgb.png")
    save_as_display_p3(picture, tmp_path / "p3.png")
    original = np.asarray(load_rgb(tmp_path / "srgb.png", BACKGROUND), dtype=int)
    managed = np.asarray(load_rgb(tmp_path / "p3.png", BACKGROUND), dtype=int)
    assert np.abs(managed - original).max() <= 3, "P3 -> sRGB gives back the sRGB values (8-bit rounding twice)"
    assert np.abs(managed - original).mean() < 0.5
    stored = np.asarray(load_rgb(tmp_path / "p3.png", BACKGROUND, colour_manage=False), dtype=int)
    assert np.abs(stored - original).max() > 20, "negative control: the P3 numbers read as sRGB are other colours"
    assert stored[0, 0, 0] < original[0, 0, 0] - 10, "a saturated red is stored as a smaller red value in P3"


def test_colour_conversion_keeps_the_alpha_mask(tmp_path):
    picture = reddish_picture(1)
    save_as_display_p3(picture, tmp_path / "p3.png", mode="RGBA")
    rgba = Image.open(tmp_path / "p3.png").convert("RGBA")
    mask = np.zeros((24, 24), np.uint8)
    mask[4:20, 4:20] = 255
    rgba.putalpha(Image.fromarray(mask))
    rgba.save(tmp_path / "crop.png", icc_profile=display_p3_profile())
    rgb = np.asarray(load_rgb(tmp_path / "crop.png", BACKGROUND), dtype=int)
    assert tuple(rgb[0, 0]) == BACKGROUND, "outside the mask: the background, not converted colours"
    assert np.abs(rgb[4:20, 4:20] - np.asarray(picture, dtype=int)[4:20, 4:20]).max() <= 3


def test_jpeg_with_a_profile_is_converted_and_one_without_is_read_as_srgb(tmp_path):
    picture = Image.new("RGB", (32, 32), (200, 70, 70))
    picture.save(tmp_path / "plain.jpg", quality=95)
    save_as_display_p3(picture, tmp_path / "p3.jpg", quality=95)
    plain = np.asarray(load_rgb(tmp_path / "plain.jpg", BACKGROUND), dtype=float).mean(axis=(0, 1))
    assert np.abs(plain - (200, 70, 70)).max() <= 2, "no profile: the stored values, taken as sRGB"
    managed = np.asarray(load_rgb(tmp_path / "p3.jpg", BACKGROUND), dtype=float).mean(axis=(0, 1))
    stored = np.asarray(load_rgb(tmp_path / "p3.jpg", BACKGROUND, colour_manage=False), dtype=float).mean(axis=(0, 1))
    assert np.abs(managed - (200, 70, 70)).max() <= 2
    assert np.abs(stored - (200, 70, 70)).max() > 8, "negative control: the P3 numbers are not the sRGB colour"


def test_an_unreadable_or_mismatched_profile_is_a_colour_error_naming_the_fix(tmp_path):
    picture = reddish_picture(3)
    picture.save(tmp_path / "garbage.png", icc_profile=b"not an ICC profile at all")
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    picture.save(tmp_path / "lab_on_rgb.png", icc_profile=lab)
    with pytest.raises(ColourError, match="cannot be read.*sRGB"):
        load_rgb(tmp_path / "garbage.png", BACKGROUND)
    with pytest.raises(ColourError, match="cannot convert this RGB image"):
        load_rgb(tmp_path / "lab_on_rgb.png", BACKGROUND)
    assert load_rgb(tmp_path / "garbage.png", BACKGROUND, colour_manage=False).size == (24, 24)


def test_heic_files_are_found_and_decoded_with_their_profile(tmp_path):
    assert ".heic" in IMAGE_EXTENSIONS and ".heif" in IMAGE_EXTENSIONS
    picture = reddish_picture(4, size=64).resize((64, 64))
    save_as_display_p3(picture, tmp_path / "phone.heic", quality=-1, chroma=444)
    rgb = np.asarray(load_rgb(tmp_path / "phone.heic", BACKGROUND), dtype=int)
    assert rgb.shape == (64, 64, 3)
    assert np.abs(rgb - np.asarray(picture, dtype=int)).mean() < 3, "lossless HEIC, P3 converted back to sRGB"
