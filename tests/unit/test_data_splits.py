"""The train/validation split: stratified, patient-grouped, reproducible, weights from train only;
and respecting the audit: duplicates, patients and sites in one split; k folds; bad-file policy."""

from __future__ import annotations

import csv
import hashlib
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from helpers import BAD, add_bad_files, make_image_folder, make_manifest, write_csv
from sklearn.model_selection import StratifiedGroupKFold

from anemia_dist.config import DataConfig
from anemia_dist.errors import DataError
from anemia_dist.splits import balanced_class_weights, build_split


def test_split_keeps_patients_whole_stratifies_and_is_reproducible(tmp_path):
    manifest = make_manifest(tmp_path, {"anemic": 30, "non-anemic": 60}, per_group=3)
    cfg = DataConfig(manifest=str(manifest), val_fraction=0.2)
    first, again, other = build_split(cfg, seed=1), build_split(cfg, seed=1), build_split(cfg, seed=2)
    assert {s.group for s in first.train}.isdisjoint({s.group for s in first.val})
    assert [s.path for s in first.val] == [s.path for s in again.val]
    assert [s.path for s in first.val] != [s.path for s in other.val]
    counts = Counter(first.classes[s.label] for s in first.val)
    assert counts["anemic"] == pytest.approx(6, abs=3) and counts["non-anemic"] == pytest.approx(12, abs=3)
    assert len(first.train) + len(first.val) == 90


def test_class_order_is_explicit_and_weights_come_from_the_training_split(tmp_path):
    manifest = make_manifest(tmp_path, {"anemic": 20, "non-anemic": 40}, per_group=1)
    split = build_split(DataConfig(manifest=str(manifest), classes=["non-anemic", "anemic"]), seed=0)
    assert split.classes == ["non-anemic", "anemic"]
    weights = balanced_class_weights(split.train, 2)
    counts = Counter(s.label for s in split.train)
    n = len(split.train)
    assert weights.tolist() == pytest.approx([n / (2 * counts[0]), n / (2 * counts[1])])


def test_manifest_with_missing_files_is_an_error_listing_them(tmp_path):
    manifest = make_manifest(tmp_path, {"a": 4, "b": 4})
    (tmp_path / "a" / "img_001.png").unlink()
    with pytest.raises(DataError, match="img_001.png"):
        build_split(DataConfig(manifest=str(manifest)), seed=0)


def test_too_few_groups_for_the_split_is_an_error_naming_the_remedy(tmp_path):
    manifest = make_manifest(tmp_path, {"a": 4, "b": 20}, per_group=4)
    with pytest.raises(DataError, match="val_fraction"):
        build_split(DataConfig(manifest=str(manifest), val_fraction=0.2), seed=0)


def read_rows(manifest: Path) -> list[dict]:
    with manifest.open(newline="") as handle:
        return list(csv.DictReader(handle))


def with_copies(root: Path) -> Path:
    """40 patients x 2 images, then 12 of them copied under other patients of the same class."""
    manifest = make_manifest(root, {"anemic": 30, "non-anemic": 50}, per_group=2)
    rows = read_rows(manifest)
    for n, row in enumerate(rows[:60:5]):  # 12 originals, each copied to a patient 13 rows on
        other = rows[(rows.index(row) + 26) % len(rows)]
        copy = Path(row["path"]).with_name(f"copy_{n}.png")
        shutil.copy(root / row["path"], root / copy)
        rows.append({"path": str(copy), "label": row["label"], "group": other["group"]})
    return write_csv(manifest, rows)


def content(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def sides(split, key) -> dict[str, set[str]]:
    found = defaultdict(set)
    for name, part in (("train", split.train), ("val", split.val)):
        for sample in part:
            found[key(sample)].add(name)
    return found


def test_copies_and_patients_stay_in_one_split_in_every_fold(tmp_path):
    manifest = with_copies(tmp_path)
    rows = read_rows(manifest)
    # Control: splitting by patient alone puts copies on both sides.
    hashes = [content(str(tmp_path / r["path"])) for r in rows]
    naive = StratifiedGroupKFold(5, shuffle=True, random_state=0).split(
        rows, [r["label"] for r in rows], [r["group"] for r in rows]
    )
    for _, val in naive:
        in_val = defaultdict(set)
        for i, digest in enumerate(hashes):
            in_val[digest].add(i in set(val))
        assert any(len(found) > 1 for found in in_val.values())

    seen = Counter()
    for fold in range(5):
        split = build_split(DataConfig(manifest=str(manifest), folds=5, fold=fold), seed=0)
        assert all(len(s) == 1 for s in sides(split, lambda s: content(s.path)).values())
        assert all(len(s) == 1 for s in sides(split, lambda s: s.group).values())
        assert all(len(s) == 1 for s in sides(split, lambda s: s.unit).values())
        seen.update(s.path for s in split.val)
        assert len(split.train) + len(split.val) == len(rows)
    assert len(seen) == len(rows) and set(seen.values()) == {1}, "the 5 validation folds partition the data"


def test_a_fold_is_the_same_on_every_call_and_folds_differ(tmp_path):
    manifest = with_copies(tmp_path)
    cfg = DataConfig(manifest=str(manifest), folds=5, fold=2)
    first, again = build_split(cfg, seed=3), build_split(cfg, seed=3)
    other = build_split(DataConfig(manifest=str(manifest), folds=5, fold=3), seed=3)
    assert [s.path for s in first.val] == [s.path for s in again.val]
    assert {s.path for s in first.val}.isdisjoint({s.path for s in other.val})


def test_site_grouping_holds_out_whole_sites(tmp_path):
    manifest = make_manifest(tmp_path, {"anemic": 36, "non-anemic": 36}, per_group=2)
    rows = [{**r, "hospital": f"site-{i % 6}"} for i, r in enumerate(read_rows(manifest))]
    write_csv(manifest, rows)
    held_out = Counter()
    for fold in range(3):
        split = build_split(DataConfig(manifest=str(manifest), site_column="hospital", folds=3, fold=fold), seed=0)
        assert all(len(s) == 1 for s in sides(split, lambda s: s.site).values())
        held_out.update({s.site for s in split.val})
    assert held_out == Counter({f"site-{i}": 1 for i in range(6)})


def test_a_fixed_split_column_is_kept_and_copies_across_it_are_an_error(tmp_path):
    manifest = make_manifest(tmp_path, {"anemic": 8, "non-anemic": 8}, per_group=1)
    rows = [{**r, "split": "val" if i % 4 == 0 else "train"} for i, r in enumerate(read_rows(manifest))]
    write_csv(manifest, rows)
    split = build_split(DataConfig(manifest=str(manifest)), seed=0)
    assert sorted(s.path for s in split.val) == sorted(str(tmp_path / r["path"]) for r in rows if r["split"] == "val")

    shutil.copy(tmp_path / rows[0]["path"], tmp_path / "anemic" / "leak.png")
    write_csv(manifest, rows + [{"path": "anemic/leak.png", "label": rows[0]["label"], "group": "x", "split": "train"}])
    with pytest.raises(
        DataError, match=r"img_000.png \(val\).*leak.png \(train\)|leak.png \(train\).*img_000.png \(val\)"
    ):
        build_split(DataConfig(manifest=str(manifest)), seed=0)


def test_a_separate_validation_folder_holding_a_training_image_is_an_error(tmp_path):
    train = make_image_folder(tmp_path / "train", {"anemic": 4, "non-anemic": 4})
    val = make_image_folder(tmp_path / "val", {"anemic": 2, "non-anemic": 2})
    assert len(build_split(DataConfig(root=str(train), val_root=str(val)), seed=0).val) == 4
    shutil.copy(train / "anemic" / "img_001.png", val / "anemic" / "copy.png")
    with pytest.raises(DataError, match="both train and val"):
        build_split(DataConfig(root=str(train), val_root=str(val)), seed=0)


def test_bad_files_stop_the_split_with_every_file_and_the_fix(tmp_path):
    root = make_image_folder(tmp_path / "data", {"anemic": 10, "non-anemic": 10})
    add_bad_files(root)
    with pytest.raises(DataError) as error:
        build_split(DataConfig(root=str(root)), seed=0)
    message = str(error.value)
    assert "5 bad file(s)" in message and "data.bad_files=skip" in message
    bad_paths = [p for p in root.rglob("*") if p.name in BAD]
    assert len(bad_paths) == 5 and all(str(p) in message for p in bad_paths)


def test_skipped_bad_files_are_listed_and_left_out_of_split_and_class_weights(tmp_path):
    root = make_image_folder(tmp_path / "data", {"anemic": 10, "non-anemic": 20})
    add_bad_files(root)  # 3 in anemic/, 2 in non-anemic/: counting them would change the weights
    split = build_split(DataConfig(root=str(root), bad_files="skip"), seed=0)
    assert {Path(e.sample.path).name: e.reason for e in split.excluded} == BAD
    used = [s.path for s in split.train + split.val]
    assert len(used) == 30 and not {e.sample.path for e in split.excluded} & set(used)
    counts = np.bincount([s.label for s in split.train], minlength=2)
    expected = len(split.train) / (2 * counts)
    assert balanced_class_weights(split.train, 2).tolist() == pytest.approx(expected.tolist())


def test_duplicates_first_keeps_one_copy_and_leaves_out_groups_with_conflicting_labels(tmp_path):
    root = make_image_folder(tmp_path / "data", {"anemic": 10, "non-anemic": 10})
    shutil.copy(root / "anemic" / "img_001.png", root / "anemic" / "z-copy.png")
    shutil.copy(root / "anemic" / "img_002.png", root / "non-anemic" / "z-copy.png")
    split = build_split(DataConfig(root=str(root), duplicates="first"), seed=0)
    left_out = {str(Path(e.sample.path).relative_to(root)): e.reason for e in split.excluded}
    assert left_out == {
        "anemic/z-copy.png": "duplicate_copy",
        "anemic/img_002.png": "conflicting_labels",
        "non-anemic/z-copy.png": "conflicting_labels",
    }
    assert str(root / "anemic" / "img_001.png") in {s.path for s in split.train + split.val}


def test_mirrored_and_turned_copies_found_by_the_finder_stay_in_one_split_in_every_fold(tmp_path):
    from PIL import Image

    root = make_image_folder(tmp_path / "data", {"anemic": 6, "non-anemic": 6})
    for k, turn in enumerate((Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.ROTATE_180)):
        with Image.open(root / "anemic" / f"img_00{k}.png") as image:
            image.transpose(turn).save(root / "anemic" / f"copy_{k}.png")
    pairs = [(f"anemic/img_00{k}.png", f"anemic/copy_{k}.png") for k in range(2)]
    apart = 0
    for fold in range(4):
        split = build_split(DataConfig(root=str(root), folds=4, fold=fold), seed=0)
        side = {
            str(Path(s.path).relative_to(root)): name
            for name, part in (("train", split.train), ("val", split.val))
            for s in part
        }
        assert all(side[a] == side[b] for a, b in pairs)
        control = build_split(DataConfig(root=str(root), folds=4, fold=fold, near_copy_threshold=None), seed=0)
        side = {
            str(Path(s.path).relative_to(root)): n
            for n, part in (("train", control.train), ("val", control.val))
            for s in part
        }
        apart += sum(side[a] != side[b] for a, b in pairs)
    assert apart > 0, "control: without the finder some fold puts a mirrored copy on the other side"
