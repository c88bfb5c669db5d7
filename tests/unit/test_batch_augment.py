"""The batched augmentation draws the methodology's parameters and applies them as torchvision does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from anemia_dist.batch_augment import (
    AugmentParams,
    AugmentRanges,
    EvalResize,
    TrainAugment,
    augment,
    sample_params,
)
from anemia_dist.transforms import IMAGENET_MEAN, IMAGENET_STD

BILINEAR = InterpolationMode.BILINEAR


def smooth_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 pictures with structure at every angle but no pixel-level noise, so resampling
    differences stay small and a geometric error stays large."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 6, 6, generator=generator)
    fine = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (fine.clamp(0, 1) * 255).round().to(torch.uint8)


def params(**values) -> AugmentParams:
    defaults = dict(
        flip=False,
        rotation=0.0,
        angle=0.0,
        translate=(0.0, 0.0),
        scale=1.0,
        brightness=1.0,
        contrast=1.0,
        brightness_first=True,
    )
    defaults.update(values)
    return AugmentParams(**{k: torch.tensor([v]) for k, v in defaults.items()})


def torchvision_jitter(image: torch.Tensor, brightness: float, contrast: float, brightness_first: bool) -> torch.Tensor:
    if brightness_first:
        return TF.adjust_contrast(TF.adjust_brightness(image, brightness), contrast)
    return TF.adjust_brightness(TF.adjust_contrast(image, contrast), brightness)


def test_ranges_are_read_from_the_pil_pipeline_and_equal_the_methodology():
    ranges = AugmentRanges.from_pil_pipeline()
    assert ranges == AugmentRanges(
        flip_p=0.5,
        rotation=15.0,
        degrees=15.0,
        translate=0.1,
        scale=(0.8, 1.2),
        brightness=(0.8, 1.2),
        contrast=(0.8, 1.2),
    )


def test_sampled_parameters_cover_the_ranges_with_the_right_probabilities():
    n, size = 40_000, 224
    drawn = sample_params(n, size, AugmentRanges.from_pil_pipeline(), generator=torch.Generator().manual_seed(1))
    # Bernoulli(0.5) over 40k draws: the standard deviation of the fraction is 0.0025.
    assert drawn.flip.float().mean().item() == pytest.approx(0.5, abs=0.015)
    assert drawn.brightness_first.float().mean().item() == pytest.approx(0.5, abs=0.015)
    uniform = {
        "rotation": (drawn.rotation, -15.0, 15.0),
        "angle": (drawn.angle, -15.0, 15.0),
        "scale": (drawn.scale, 0.8, 1.2),
        "brightness": (drawn.brightness, 0.8, 1.2),
        "contrast": (drawn.contrast, 0.8, 1.2),
    }
    for name, (values, low, high) in uniform.items():
        width = high - low
        assert low <= values.min().item() < low + 0.01 * width, name
        assert high - 0.01 * width < values.max().item() <= high, name
        quarters = torch.histc(values, bins=4, min=low, max=high) / n
        assert torch.allclose(quarters, torch.full((4,), 0.25), atol=0.015), (name, quarters)
    # RandomAffine(translate=0.1) on 224 px: whole pixels, uniform in ±22.4 then rounded.
    shifts = drawn.translate
    assert torch.equal(shifts, shifts.round())
    assert shifts.min().item() == -22 and shifts.max().item() == 22
    assert shifts.mean().abs().max().item() < 0.3
    assert (shifts.abs() <= 11).float().mean().item() == pytest.approx(23 / 44.8, abs=0.015)


def test_flip_translate_scale_and_jitter_match_torchvision_functional():
    image = smooth_images(1, 64)
    reference_input = image.float() / 255
    for flip, brightness_first in ((True, True), (False, False)):
        fixed = params(
            flip=flip,
            translate=(3.0, -2.0),
            scale=1.2,
            brightness=1.15,
            contrast=0.85,
            brightness_first=brightness_first,
        )
        expected = TF.hflip(reference_input) if flip else reference_input
        expected = TF.affine(
            expected, angle=0.0, translate=[3, -2], scale=1.2, shear=[0.0, 0.0], interpolation=BILINEAR
        )
        expected = torchvision_jitter(expected, 1.15, 0.85, brightness_first)
        # Same grid, same bilinear sampling: equal up to float rounding.
        torch.testing.assert_close(augment(image, fixed, 64), expected, atol=1e-5, rtol=0)


def test_rotation_then_affine_equals_torchvision_single_affine_when_no_corner_is_cropped():
    # rotate(r) then affine(a) = affine(a - r) when the rotated frame's black corners stay out of view
    # (scale 1.2, small angles): our single pass must equal that one torchvision call.
    image = smooth_images(1, 64, seed=2)
    fixed = params(flip=True, rotation=4.0, angle=-3.0, scale=1.2)
    expected = TF.affine(
        TF.hflip(image.float() / 255), angle=-7.0, translate=[0, 0], scale=1.2, shear=[0.0, 0.0], interpolation=BILINEAR
    )
    torch.testing.assert_close(augment(image, fixed, 64), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "flip,rotation,angle,translate,scale",
    [
        (True, 10.0, -7.0, (3.0, -5.0), 1.1),
        (False, -15.0, 15.0, (6.0, 6.0), 0.8),
        (True, 15.0, 15.0, (-6.0, 2.0), 1.2),
    ],
)
def test_one_pass_matches_torchvision_sequential_rotate_then_affine(flip, rotation, angle, translate, scale):
    """Tolerance: mean |difference| below 0.01 of the [0, 1] range. The sequential reference
    resamples twice (slightly blurrier) and its frame edges are soft; with the rotation's sign
    reversed the mean difference is several times larger, which this bound rejects."""
    image = smooth_images(1, 64, seed=3)
    reference_input = image.float() / 255
    flipped = TF.hflip(reference_input) if flip else reference_input

    def sequential(rotation_degrees: float) -> torch.Tensor:
        rotated = TF.rotate(flipped, rotation_degrees, interpolation=BILINEAR)
        return TF.affine(
            rotated, angle=angle, translate=list(translate), scale=scale, shear=[0.0, 0.0], interpolation=BILINEAR
        )

    ours = augment(image, params(flip=flip, rotation=rotation, angle=angle, translate=translate, scale=scale), 64)
    assert (ours - sequential(rotation)).abs().mean().item() < 0.01
    assert (ours - sequential(-rotation)).abs().mean().item() > 0.02


def test_resize_from_the_working_size_is_part_of_the_same_pass():
    # Cached images are larger than the training size; identity parameters only resize.
    image = smooth_images(1, 77, seed=4)
    expected = TF.resize(image.float() / 255, [64, 64], interpolation=BILINEAR, antialias=False)
    torch.testing.assert_close(augment(image, params(), 64), expected, atol=1e-5, rtol=0)


def test_a_batch_applies_each_samples_own_parameters():
    images = smooth_images(3, 48, seed=5)
    each = [
        params(flip=True, rotation=12.0, angle=-5.0, translate=(2.0, 1.0), scale=0.9, brightness=1.2, contrast=0.8),
        params(rotation=-8.0, angle=14.0, translate=(-4.0, 0.0), scale=1.15, brightness=0.85, brightness_first=False),
        params(flip=True, scale=1.05, contrast=1.2),
    ]
    batched = AugmentParams(**{f: torch.cat([getattr(p, f) for p in each]) for f in AugmentParams.__dataclass_fields__})
    together = augment(images, batched, 40)
    alone = torch.cat([augment(images[i : i + 1], each[i], 40) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)
    assert (together[0] - together[2]).abs().mean() > 0.01


def test_train_augment_returns_normalised_channels_last_batches_at_the_training_size():
    images = smooth_images(8, 39)
    out = TrainAugment(32)(images)
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    unit = out * std + mean
    assert unit.min() >= -1e-6 and unit.max() <= 1 + 1e-6
    again = TrainAugment(32)(images)
    assert not torch.allclose(out, again), "a fresh draw per call"


def test_eval_resize_equals_torchvision_resize_and_normalize():
    images = smooth_images(2, 39, seed=6)
    expected = TF.normalize(
        TF.resize(images.float() / 255, [32, 32], interpolation=BILINEAR, antialias=True), IMAGENET_MEAN, IMAGENET_STD
    )
    out = EvalResize(32, channels_last=False)(images)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert out.is_contiguous()
    torch.testing.assert_close(EvalResize(32)(images), out, atol=0, rtol=0)
