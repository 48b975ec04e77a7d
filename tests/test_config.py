from __future__ import annotations

from pathlib import Path

import pytest

from pneumoscope.config import (
    RunConfig,
    checkpoint_data_config,
    checkpoint_split_seed,
    load_config,
    parse_override,
    save_config,
)


def test_defaults_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: resnet18\ntrain:\n  epochs: 3\n")
    cfg = load_config(path, {"data": {"image_size": 128}}, ["train.lr=3e-4", "data.augment=none"])
    assert cfg.model.name == "resnet18" and cfg.train.epochs == 3
    assert cfg.data.image_size == 128 and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.augment == "none"
    assert cfg.run_dir == Path("runs/resnet18-seed42")
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    assert load_config() == RunConfig()


@pytest.mark.parametrize(("override", "message"), [
    ("model.name=resnet19", "unknown model 'resnet19'.*resnet18"),
    ("train.epochs=0", "train.epochs must be >= 1, got 0"),
    ("data.image_size=5000", "data.image_size"),
    ("data.class_balance=oversample", "data.class_balance must be one of"),
    ("data.colour=1", "unknown config key.*data.colour"),
    ("train.lr=fast", "train.lr must be a number, got 'fast'"),
    ("eval.threshold_method=target_sensitivity", "eval.target_sensitivity must be in"),
    ("data.augment=wild", "data.augment must be one of"),
    ("compare.models=[resnet18, resnet18]", "compare.models lists a model twice"),
    ("compare.weights={vgg16: none}", "compare.weights names vgg16"),
])
def test_bad_values_are_named(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(dotted=[override])


def test_configs_written_before_one_augment_knob_still_load(tmp_path: Path) -> None:
    path = tmp_path / "old.yaml"
    path.write_text("data:\n  augment: true\n  augment_preset: texture\n")
    assert load_config(path).data.augment == "texture"
    assert load_config(dotted=["data.augment=false"]).data.augment == "none"


def test_study_lists_are_typed_and_round_trip(tmp_path: Path) -> None:
    cfg = load_config(dotted=["compare.models=efficientnet_lite0,resnet18",
                              "compare.weights=resnet18=none"])
    assert cfg.compare.models == ("efficientnet_lite0", "resnet18")
    assert cfg.compare.sources("package") == {"efficientnet_lite0": "package", "resnet18": "none"}
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_bad_files_and_override_syntax(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ValueError, match=r"section\.key=value"):
        parse_override("train.epochs")
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}


def test_config_is_frozen() -> None:
    cfg = RunConfig()
    with pytest.raises(AttributeError):
        cfg.train.epochs = 5  # type: ignore[misc]


def test_strategies_that_pickle_the_run_into_new_processes_are_refused() -> None:
    assert load_config(dotted=["train.strategy=ddp"]).train.strategy == "ddp"
    for strategy in ("ddp_spawn", "ddp_fork", "ddp_notebook"):
        with pytest.raises(ValueError, match=f"train.strategy '{strategy}' is not supported: use ddp"):
            load_config(dotted=[f"train.strategy={strategy}"])


def test_split_seed_defaults_to_the_training_seed_and_can_be_pinned() -> None:
    assert load_config(dotted=["train.seed=3"]).split_seed == 3
    pinned = load_config(dotted=["train.seed=3", "data.split_seed=0"])
    assert (pinned.split_seed, pinned.train.seed) == (0, 3)
    with pytest.raises(ValueError, match=r"data\.split_seed must be >= 0"):
        load_config(dotted=["data.split_seed=-1"])
    assert checkpoint_split_seed(pinned.to_dict(), 42) == 0
    assert checkpoint_split_seed(load_config(dotted=["train.seed=5"]).to_dict(), 42) == 5
    assert checkpoint_split_seed({}, 42) == 42


def test_checkpoint_data_config_keeps_the_saved_split_fields_only() -> None:
    saved = load_config(dotted=["train.seed=3", "data.split_seed=1", "data.val_fraction=0.2",
                                "data.subset=0.5", "data.cache_dir=/elsewhere",
                                "data.image_size=64"]).to_dict()
    config = checkpoint_data_config(saved, "/data", 128)
    assert (config.split_seed, config.train.seed) == (1, 3)
    assert (config.data.val_fraction, config.data.subset) == (0.2, 0.5)
    assert (config.data.root, config.data.image_size, config.data.cache_dir) == ("/data", 128, None)
    old = checkpoint_data_config({}, "/data", 64)  # a file that records no config: the defaults
    assert (old.split_seed, old.data.val_fraction) == (RunConfig().split_seed, RunConfig().data.val_fraction)
