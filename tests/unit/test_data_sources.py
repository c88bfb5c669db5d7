"""Data sources: manifests whose label comes from a measurement, image IDs, the CP-AnemiC config."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_image_folder, write_csv

from anemia_dist.config import DataConfig, load_config
from anemia_dist.errors import ConfigError, DataError
from anemia_dist.sources import load_samples

WHO_RULES = [
    {"threshold": 11.0, "when": ["age_months < 60"]},
    {"threshold": 11.5, "when": ["age_months < 144"]},
    {"threshold": 12.0, "when": ["age_months < 180"]},
    {"threshold": 12.0, "when": ["sex == F"]},
    {"threshold": 13.0, "when": ["sex == M"]},
]


def measured(tmp_path: Path, rows: list[dict]) -> Path:
    """Images img_000.. listed with the given extra columns; paths relative to the manifest."""
    make_image_folder(tmp_path / "images", {"all": len(rows), "unused": 1})
    return write_csv(tmp_path / "sheet.csv", [{"path": f"images/all/img_{i:03d}.png", **r} for i, r in enumerate(rows)])


def labels(cfg: DataConfig) -> list[str]:
    samples, classes = load_samples(cfg)
    return [classes[s.label] for s in samples]


def test_label_is_below_label_when_the_measurement_is_under_the_threshold(tmp_path):
    manifest = measured(tmp_path, [{"hb": "10.99"}, {"hb": "11"}, {"hb": " 7.2 "}, {"hb": "13.4"}])
    cfg = DataConfig(manifest=str(manifest), measure_column="hb", threshold=11.0)
    assert labels(cfg) == ["anemic", "non-anemic", "anemic", "non-anemic"]
    samples, classes = load_samples(cfg)
    assert classes == ["anemic", "non-anemic"] and all(Path(s.path).is_file() for s in samples)


def test_threshold_can_come_from_a_column(tmp_path):
    manifest = measured(tmp_path, [{"hb": "11.2", "cut": "11.5"}, {"hb": "11.2", "cut": "11.0"}])
    cfg = DataConfig(manifest=str(manifest), measure_column="hb", threshold_column="cut")
    assert labels(cfg) == ["anemic", "non-anemic"]


def test_threshold_rules_apply_who_cut_offs_by_age_and_sex_first_match_wins(tmp_path):
    people = [
        ("10.8", "30", "F", "anemic"),  # child under 5: 11.0
        ("11.2", "30", "M", "non-anemic"),
        ("11.2", "100", "M", "anemic"),  # 5-11 years: 11.5
        ("11.8", "170", "F", "anemic"),  # 12-14 years: 12.0
        ("12.5", "400", "F", "non-anemic"),  # woman: 12.0
        ("12.5", "400", "M", "anemic"),  # man: 13.0
    ]
    manifest = measured(tmp_path, [{"hb": hb, "age_months": age, "sex": sex} for hb, age, sex, _ in people])
    cfg = load_config(
        None, [f"data.manifest={manifest}", "data.measure_column=hb", f"data.threshold_rules={WHO_RULES}"]
    )
    assert labels(cfg.data) == [expected for *_, expected in people]


def test_a_row_no_rule_covers_is_an_error_naming_its_line(tmp_path):
    manifest = measured(
        tmp_path, [{"hb": "12", "age_months": "30", "sex": "F"}, {"hb": "12", "age_months": "400", "sex": "X"}]
    )
    cfg = load_config(
        None, [f"data.manifest={manifest}", "data.measure_column=hb", f"data.threshold_rules={WHO_RULES}"]
    )
    with pytest.raises(DataError, match=r"line 3: no rule"):
        load_samples(cfg.data)


def test_a_measurement_that_is_not_a_number_is_an_error_naming_its_line(tmp_path):
    manifest = measured(tmp_path, [{"hb": "9.1"}, {"hb": "n/a"}])
    with pytest.raises(DataError, match=r"line 3: column 'hb' holds 'n/a'"):
        load_samples(DataConfig(manifest=str(manifest), measure_column="hb", threshold=11.0))


def test_image_ids_without_folder_or_extension_are_found_under_the_manifest_folder(tmp_path):
    make_image_folder(tmp_path, {"Anemic": 2, "Non-anemic": 2})
    (tmp_path / "Non-anemic" / "img_000.png").rename(tmp_path / "Non-anemic" / "img_100.png")
    sheet = write_csv(
        tmp_path / "sheet.csv",
        [
            {"IMAGE_ID": "img_000", "HB": "9", "HOSPITAL": "A "},
            {"IMAGE_ID": "img_100.png", "HB": "12", "HOSPITAL": "B"},
        ],
    )
    cfg = DataConfig(
        manifest=str(sheet), path_column="IMAGE_ID", measure_column="HB", threshold=11.0, site_column="HOSPITAL"
    )
    samples, _ = load_samples(cfg)
    assert [Path(s.path).relative_to(tmp_path).as_posix() for s in samples] == [
        "Anemic/img_000.png",
        "Non-anemic/img_100.png",
    ]
    assert [s.site for s in samples] == ["A", "B"]


def test_an_image_id_matching_two_files_is_an_error(tmp_path):
    make_image_folder(tmp_path, {"Anemic": 2, "Non-anemic": 2})  # img_000.png in both folders
    sheet = write_csv(tmp_path / "sheet.csv", [{"IMAGE_ID": "img_000", "label": "Anemic"}])
    with pytest.raises(DataError, match="img_000.*matches 2 files"):
        load_samples(DataConfig(manifest=str(sheet), path_column="IMAGE_ID"))


def test_a_column_the_csv_lacks_is_an_error_naming_the_key(tmp_path):
    manifest = measured(tmp_path, [{"hb": "9"}])
    with pytest.raises(DataError, match="data.site_column='HOSPITAL' is not a column"):
        load_samples(DataConfig(manifest=str(manifest), measure_column="hb", threshold=11.0, site_column="HOSPITAL"))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["data.measure_column=hb"], "data.threshold"),
        (["data.measure_column=hb", "data.threshold=11", "data.threshold_column=cut"], "data.threshold"),
        (["data.threshold=11"], "data.measure_column"),
        (
            ["data.measure_column=hb", "data.threshold_rules=[{threshold: 11, when: ['age 60']}]"],
            r"data.threshold_rules\[0\].when\[0\]",
        ),
        (["data.fold=5", "data.folds=5"], "data.fold"),
        (["data.bad_files=ignore"], "data.bad_files"),
        (["data.manifest=null", "data.root=/x", "data.site_column=HOSPITAL"], "data.site_column"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_config(None, ["data.manifest=m.csv", *overrides])


def test_packaged_cp_anemic_config_reads_the_sheet_as_released():
    cfg = load_config("cp_anemic").data
    assert (cfg.path_column, cfg.measure_column, cfg.threshold) == ("IMAGE_ID", "HB_LEVEL", 11.0)
    assert (cfg.below_label, cfg.above_label, cfg.bad_files) == ("Anemic", "Non-anemic", "error")
