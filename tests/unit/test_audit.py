"""The data audit: every kind of bad file, exact and near duplicates, label conflicts, the report."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
from helpers import BAD, add_bad_files, display_p3_profile, encoded, make_image_folder
from PIL import Image

from anemia_dist import near_copies
from anemia_dist.audit import AuditReport, audit_data, near_pairs
from anemia_dist.cli import main
from anemia_dist.config import DataConfig
from anemia_dist.run_dir import AUDIT_CSV, AUDIT_JSON


def smooth_picture(seed: int, size: int = 64) -> Image.Image:
    """A smooth random field: structure a perceptual hash can see (pure noise has none)."""
    coarse = np.random.default_rng(seed).integers(0, 255, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)


def audit(root: Path, **settings) -> AuditReport:
    return audit_data(DataConfig(root=str(root), **settings))[2]


def by_name(report: AuditReport) -> dict[str, str]:
    return {Path(c.path).name: c.problem for c in report.checks if c.problem}


def test_audit_names_each_kind_of_bad_file_and_passes_the_good_ones(tmp_path):
    root = make_image_folder(tmp_path / "data", {"anemic": 5, "non-anemic": 5})
    add_bad_files(root)
    report = audit(root)
    assert by_name(report) == BAD
    assert len(report.checks) == 15 and len(report.bad) == 5
    good = [c for c in report.checks if c.problem is None]
    assert all(c.width == 24 and len(c.dhash) == 32 and len(c.sha256) == 64 for c in good)
    assert report.summary()["class_counts_without_bad_files"] == {"anemic": 5, "non-anemic": 5}


def test_min_size_sets_what_counts_as_too_small(tmp_path):
    root = make_image_folder(tmp_path / "data", {"anemic": 2, "non-anemic": 2})
    assert by_name(audit(root, min_size=24)) == {}
    assert set(by_name(audit(root, min_size=25)).values()) == {"too_small"}


def test_manifest_row_for_a_missing_file_is_reported_not_dropped(tmp_path):
    make_image_folder(tmp_path, {"anemic": 2, "non-anemic": 2})
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "path,label\nanemic/img_000.png,anemic\nanemic/gone.png,anemic\nnon-anemic/img_000.png,non-anemic\n"
    )
    report = audit_data(DataConfig(manifest=str(manifest)))[2]
    assert by_name(report) == {"gone.png": "missing"} and len(report.checks) == 3


def test_byte_identical_copies_form_one_group_and_opposite_labels_conflict(tmp_path):
    root = make_image_folder(tmp_path / "data", {"anemic": 4, "non-anemic": 4})
    shutil.copy(root / "anemic" / "img_000.png", root / "anemic" / "copy.png")
    shutil.copy(root / "anemic" / "img_000.png", root / "non-anemic" / "copy.png")
    shutil.copy(root / "non-anemic" / "img_001.png", root / "non-anemic" / "same-label-copy.png")
    report = audit(root)
    groups = sorted(sorted(str(Path(report.checks[i].path).relative_to(root)) for i in g) for g in report.exact_groups)
    assert groups == [
        ["anemic/copy.png", "anemic/img_000.png", "non-anemic/copy.png"],
        ["non-anemic/img_001.png", "non-anemic/same-label-copy.png"],
    ]
    assert [(scope, len(report.exact_groups[i])) for scope, i in report.conflicts] == [("exact", 3)]


def test_reencoded_resized_copy_is_a_near_duplicate_and_a_different_picture_is_not(tmp_path):
    root = make_image_folder(tmp_path / "data", {"anemic": 3, "non-anemic": 3})
    original = smooth_picture(1)
    original.save(root / "anemic" / "eye.png")
    (root / "anemic" / "eye-again.jpg").write_bytes(encoded(original.resize((52, 52)), "JPEG", quality=80))
    smooth_picture(2).save(root / "non-anemic" / "other-eye.png")
    report = audit(root)
    assert [sorted(Path(report.checks[i].path).name for i in g) for g in report.near_groups] == [
        ["eye-again.jpg", "eye.png"]
    ]
    assert report.exact_groups == [] and report.conflicts == []
    assert audit(root, near_duplicate_distance=None, near_copy_threshold=None).near_groups == []


def test_near_pairs_finds_exactly_the_pairs_within_the_distance():
    rng = np.random.default_rng(0)
    hashes = [rng.integers(0, 256, 32, dtype=np.uint8) for _ in range(130)]  # more than one block
    hashes[129] = hashes[3].copy()
    hashes[129][0] ^= 0b111  # 3 bits apart
    hashes[70] = hashes[5].copy()
    hashes[70][:4] ^= 0xFF  # 32 bits apart
    pairs = near_pairs([h.tobytes() for h in hashes], max_distance=3)
    assert pairs == [(3, 129)]
    assert (5, 70) in near_pairs([h.tobytes() for h in hashes], max_distance=32)


def test_report_lists_every_finding_with_its_path_and_the_counts(tmp_path):
    root = make_image_folder(tmp_path / "data", {"anemic": 4, "non-anemic": 4})
    add_bad_files(root)
    shutil.copy(root / "anemic" / "img_000.png", root / "non-anemic" / "copy.png")
    audit(root).write(tmp_path / "report")
    with (tmp_path / "report" / AUDIT_CSV).open() as handle:
        rows = list(csv.DictReader(handle))
    found = {(r["kind"], Path(r["path"]).name) for r in rows}
    assert {(kind, name) for name, kind in BAD.items()} <= found
    assert {("exact_duplicate", "img_000.png"), ("exact_duplicate", "copy.png")} <= found
    assert {("conflicting_labels", "img_000.png"), ("conflicting_labels", "copy.png")} <= found
    assert all(Path(r["path"]).exists() for r in rows)
    counts = json.loads((tmp_path / "report" / AUDIT_JSON).read_text())
    assert counts["class_counts"] == {"anemic": 7, "non-anemic": 7} and counts["bad_files"] == 5
    assert counts["bad_by_kind"] == {"empty": 1, "not_image": 1, "too_small": 1, "truncated": 2}


def test_audit_data_command_writes_the_report_and_fails_only_when_training_would_stop(tmp_path, capsys):
    root = make_image_folder(tmp_path / "data", {"anemic": 4, "non-anemic": 4})
    assert main(["audit-data", f"data.root={root}", "--out", str(tmp_path / "clean")]) == 0
    assert (tmp_path / "clean" / AUDIT_CSV).is_file()
    add_bad_files(root)
    assert main(["audit-data", f"data.root={root}", "--out", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert all(name in err for name in BAD) and "data.bad_files=skip" in err
    assert main(["audit-data", f"data.root={root}", "data.bad_files=skip", "--out", str(tmp_path / "skip")]) == 0


def test_audit_decodes_large_jpegs_at_the_training_scale_and_still_finds_truncation(tmp_path, monkeypatch):
    # The audit decodes what the decoded-image cache decodes: a photo far above the training
    # size at a reduced DCT scale. A cut-off stream must still fail at that scale.
    from anemia_dist import audit as audit_module

    root = make_image_folder(tmp_path / "data", {"anemic": 2, "non-anemic": 2})
    photo = encoded(smooth_picture(3, size=1600).resize((1200, 1600)), "JPEG", quality=90)
    (root / "anemic" / "photo.jpg").write_bytes(photo)
    (root / "non-anemic" / "photo-cut.jpg").write_bytes(photo[: len(photo) * 3 // 4])
    decoded_sizes = []
    real = audit_module.decode_rgb

    def spy(image, background, min_side):
        rgb = real(image, background, min_side)
        decoded_sizes.append(rgb.size)
        return rgb

    monkeypatch.setattr(audit_module, "decode_rgb", spy)
    report = audit(root, image_size=64)  # the cache decodes at working_size(64) = 77 px
    assert by_name(report) == {"photo-cut.jpg": "truncated"}
    assert (150, 200) in decoded_sizes and (1200, 1600) not in decoded_sizes  # 1/8 scale: both sides >= 77
    photo_check = next(c for c in report.checks if c.path.endswith("photo.jpg"))
    assert (photo_check.width, photo_check.height) == (1200, 1600)  # the file's own size


def test_audit_counts_colour_profiles_and_cameras_and_flags_unconvertible_colour(tmp_path):
    root = make_image_folder(tmp_path / "data", {"anemic": 3, "non-anemic": 3})
    picture = smooth_picture(11)
    p3 = display_p3_profile()
    for i, name in enumerate(("phone_a.jpg", "phone_b.jpg")):
        exif = Image.Exif()
        exif[0x010F], exif[0x0110] = "Apple", "iPhone 12"
        smooth_picture(20 + i).save(root / "anemic" / name, icc_profile=p3, exif=exif)
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Canon", "Canon EOS R5"
    smooth_picture(30).save(root / "non-anemic" / "camera.jpg", exif=exif)
    picture.save(root / "non-anemic" / "broken_profile.png", icc_profile=b"not a profile")
    report = audit(root)
    summary = report.summary()
    assert summary["colour_profiles"] == {"Display P3": 2}
    assert summary["without_colour_profile"] == 6 + 1, "the generated PNGs and the Canon JPEG carry none"
    assert summary["cameras"] == {"Apple iPhone 12": 2, "Canon EOS R5": 1}
    assert summary["without_camera"] == 6 + 1
    assert summary["unconvertible_colour"] == 1
    assert by_name(report) == {"broken_profile.png": "unconvertible_colour"}
    assert summary["bad_by_kind"] == {"unconvertible_colour": 1}
    text = report.summary_text()
    assert "colour profiles: Display P3 x2; 7 files without one (read as sRGB); 1 cannot be converted" in text
    assert "cameras (EXIF make and model): Apple iPhone 12 x2, Canon EOS R5 x1; 7 files without" in text
    rows = [row for row in report.rows() if row["kind"] == "unconvertible_colour"]
    assert len(rows) == 1 and "ICC profile cannot be read" in rows[0]["detail"]


def test_mirrored_copies_are_grouped_by_the_near_copy_finder_and_the_json_names_it(tmp_path):
    root = make_image_folder(tmp_path / "data", {"anemic": 4, "non-anemic": 4})
    original = smooth_picture(3)
    original.save(root / "anemic" / "eye.png")
    mirrored = original.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((56, 56))
    (root / "non-anemic" / "eye-mirrored.jpg").write_bytes(encoded(mirrored, "JPEG", quality=85))
    report = audit(root)
    assert [sorted(Path(report.checks[i].path).name for i in g) for g in report.near_groups] == [
        ["eye-mirrored.jpg", "eye.png"]
    ]
    # Control: the difference hash alone does not see a mirror.
    assert audit(root, near_copy_threshold=None).near_groups == []
    report.write(tmp_path / "report")
    summary = json.loads((tmp_path / "report" / AUDIT_JSON).read_text())
    assert summary["near_copy_finder"] == near_copies.VERSION and summary["near_copy_threshold"] == 0.10
    assert summary["copy_groups"] == 1 and summary["distinct_pictures"] == 9 and summary["largest_copy_group"] == 2
    (conflict,) = summary["conflicting_label_groups"]
    assert {(Path(m["path"]).name, m["label"]) for m in conflict["members"]} == {
        ("eye.png", "anemic"),
        ("eye-mirrored.jpg", "non-anemic"),
    }
    assert audit(root, near_copy_threshold=0.0).near_groups == []


def test_pairs_reviewed_as_copies_join_one_group(tmp_path):
    root = make_image_folder(tmp_path / "data", {"anemic": 4, "non-anemic": 4})
    review = tmp_path / "review.csv"
    copy, distinct = (root / "anemic" / "img_001.png", root / "non-anemic" / "img_002.png"), ("img_000", "img_003")
    review.write_text(f"a,b,verdict,note\n{copy[0]},{copy[1]},copy,re-cut\n{distinct[0]},{distinct[1]},distinct,\n")
    report = audit(root, copy_review=str(review))
    assert [sorted(report.checks[i].path for i in g) for g in report.near_groups] == [sorted(map(str, copy))]
    assert report.reviewed_copies == 1 and len(report.conflicts) == 1
    assert audit(root).near_groups == []  # control: without the review they are different pictures


def test_copies_with_different_measurements_are_listed_with_every_member(tmp_path):
    make_image_folder(tmp_path, {"a": 3, "b": 1})
    shutil.copy(tmp_path / "a" / "img_000.png", tmp_path / "a" / "copy.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,hb\na/img_000.png,10.2\na/copy.png,12.5\na/img_001.png,9.0\na/img_002.png,13.0\n")
    cfg = DataConfig(manifest=str(manifest), measure_column="hb", threshold=11.0)
    report = audit_data(cfg)[2]
    summary = report.summary()
    (conflict,) = summary["conflicting_measure_groups"]
    rows = [
        (r["kind"], Path(r["path"]).name, r["detail"]) for r in report.rows() if r["kind"] == "conflicting_measures"
    ]
    detail = "exact duplicates measured 10.2, 12.5"
    assert sorted(rows) == [("conflicting_measures", name, detail) for name in ("copy.png", "img_000.png")]
    assert {(Path(m["path"]).name, m["label"], m["measure"]) for m in conflict["members"]} == {
        ("img_000.png", cfg.below_label, "10.2"),
        ("copy.png", cfg.above_label, "12.5"),
    }
    assert len(summary["conflicting_label_groups"]) == 1
    assert audit(tmp_path).summary()["conflicting_measure_groups"] == []  # a folder has no measurements


def test_a_reviewed_name_that_several_files_share_links_none_of_them(tmp_path):
    root = make_image_folder(tmp_path / "data", {"anemic": 4, "non-anemic": 4})
    review = tmp_path / "review.csv"
    review.write_text("a,b,verdict,note\nimg_001,img_002,copy,ambiguous stems\n")  # in both class folders
    assert audit(root, copy_review=str(review)).near_groups == []
