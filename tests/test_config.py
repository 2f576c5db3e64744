"""RunConfig: every value coerced to its type and checked before work starts; names and records of what ran."""
from __future__ import annotations

import pytest
import yaml

from dspt.config import ConfigError, RunConfig, coerce_field
from dspt.sweep import expand, load_grid


def test_yaml_numbers_and_words_are_coerced_from_the_field_types(tmp_path):
    """PyYAML reads 2e-3 and 1e-5 as strings: the grid must still cross numbers, not text."""
    grid = tmp_path / "grid.yaml"
    grid.write_text("data: imgs\nmodel: dspt-tiny\npretrained: none\noutput: out\n"
                    "lr: [2e-3, 0.02]\nwarmup_lr: 1e-5\nmomentum: '0.9'\nhflip: 'false'\nshots: all\n"
                    "val_shots: coop\nloss_options: {}\n")
    spec = load_grid(grid)
    assert spec["lr"] == ["2e-3", 0.02] and spec["warmup_lr"] == "1e-5"  # what YAML gives us
    cells = expand(spec)
    assert [c.config.lr for c in cells] == [0.002, 0.02]
    assert [c.name for c in cells] == ["lr=0.002", "lr=0.02"]
    cfg = cells[0].config
    assert cfg.warmup_lr == 1e-5 and isinstance(cfg.warmup_lr, float)
    assert cfg.momentum == 0.9 and cfg.hflip is False and cfg.pretrained is None and cfg.shots == 0
    assert cfg.val_shots == 4  # CoOp's min(K, 4); the full split counts as K >= 4


def test_python_config_is_coerced_too():
    cfg = RunConfig(data="x", lr="2e-3", epochs="30", seed="0", csc="true", pretrained="none",
                    loss_options={"q": "0.7"}, loss="gce").resolved()
    assert (cfg.lr, cfg.epochs, cfg.seed, cfg.csc, cfg.pretrained) == (0.002, 30, 0, True, None)
    assert cfg.loss_options == {"q": 0.7}


@pytest.mark.parametrize("field, value, message", [
    ("lr", "fast", r"--lr 'fast' is not a number"),
    ("epochs", "2.5", r"--epochs '2.5' is not an integer"),
    ("epochs", True, r"--epochs True is not an integer"),
    ("hflip", "maybe", r"--hflip 'maybe' is not true or false"),
    ("lr", "nan", r"--lr 'nan' is not a finite number"),
    ("model", None, r"--model None is not a str"),
    ("loss_options", "q=1", r"--loss-options 'q=1' is not a mapping"),
])
def test_bad_values_name_the_option(field, value, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(data="x", **{field: value}).resolved()


def test_a_bad_grid_value_fails_before_any_run_starts(tmp_path):
    grid = {"data": "imgs", "output": str(tmp_path / "out"), "lr": [0.002, "oops"]}
    with pytest.raises(ConfigError, match=r"grid option 'lr': --lr 'oops' is not a number"):
        expand(grid)
    assert not (tmp_path / "out").exists()


def test_range_checks_cover_optimiser_fields():
    with pytest.raises(ConfigError, match="--momentum 1.5 is invalid"):
        RunConfig(data="x", momentum=1.5).resolved()
    with pytest.raises(ConfigError, match="--warmup-lr 0.0 is invalid"):
        RunConfig(data="x", warmup_lr=0).resolved()
    with pytest.raises(ConfigError, match="--val-labels 'dirty' unknown"):
        RunConfig(data="x", val_labels="dirty").resolved()


def test_ctx_init_sets_and_records_the_context_length():
    cfg = RunConfig(data="x", model="dspt-tiny", pretrained=None, ctx_init="a photo of a").resolved()
    assert cfg.n_ctx == 4
    assert yaml.safe_load(cfg.dump())["n_ctx"] == 4  # config.yaml says what runs
    assert RunConfig(data="x", model="dspt-tiny", pretrained=None, ctx_init="a photo of a", n_ctx=4).resolved()
    with pytest.raises(ConfigError, match=r"'a photo of a' is 4 tokens.*not --n-ctx 16; drop --n-ctx"):
        RunConfig(data="x", model="dspt-tiny", pretrained=None, ctx_init="a photo of a", n_ctx=16).resolved()
    assert RunConfig(data="x").resolved().n_ctx == 16


def test_default_folder_name_differs_for_every_option_that_changes_the_run():
    base = RunConfig(data="imgs", model="dspt-tiny", pretrained=None)
    name = base.resolved().output
    assert base.resolved().output == name  # stable
    changed = {"lr": 0.02, "epochs": 7, "batch_size": 8, "weight_decay": 0.0, "views": 3, "ctx_init": "a photo of a",
               "csc": True, "val_labels": "clean", "split_seed": 2, "template": "a {}."}
    names = {k: RunConfig(data="imgs", model="dspt-tiny", pretrained=None, **{k: v}).resolved().output
             for k, v in changed.items()}
    assert name not in names.values() and len(set(names.values())) == len(names)
    assert names["lr"].endswith("-lr0.02") and "-e7" in names["epochs"]
    # where or how fast a run executes does not make it another run
    assert RunConfig(data="imgs", model="dspt-tiny", pretrained=None, workers=3, progress=False).resolved().output \
        == name


def test_coerce_field_spellings():
    assert coerce_field("shots", "all") == 0 and coerce_field("checkpoint", "None") is None
    assert coerce_field("noise_rate", "0.4") == 0.4 and coerce_field("seed", 0) == 0
    with pytest.raises(ConfigError, match="unknown option 'lrr'"):
        coerce_field("lrr", 1)


def test_an_unknown_model_is_refused_before_any_data_is_read(tmp_path):
    from dspt.errors import BackboneError

    with pytest.raises(BackboneError, match="unknown model 'ViT-Q'"):
        RunConfig(data=str(tmp_path / "no-such-folder"), model="ViT-Q").resolved()
