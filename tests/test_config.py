import pytest

from defectflow.config import ConfigError, from_yaml, load_config, to_yaml


def test_defaults_merge_named_config_and_overrides():
    cfg = load_config("demo", ["train.epochs=3", "model.input_size=64"])
    assert cfg.train.epochs == 3
    assert cfg.model.input_size == 64
    assert cfg.tune.max_trials == 2  # from configs/demo.yaml
    assert cfg.data.root == cfg.data.synth.out  # interpolation resolved


def test_saved_config_round_trips():
    cfg = load_config("default", ["train.batch_size=4"])
    again = from_yaml(to_yaml(cfg))
    assert again.train.batch_size == 4
    assert again == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.epochs=many"], "invalid configuration"),
        (["no_such_key=1"], "invalid configuration"),
        (["train.epochs"], "key=value"),
        (["data.split.train=0.9"], "sum to 1"),
        (["model.input_size=100"], "divisible by 32"),
        (["model.backbone=plain", "model.input_size=100"], "divisible by 16"),
        (["model.backbone=vgg"], "lite0 or plain"),
        (["train.device=tpu"], "auto, cpu or gpu"),
        (["eval.mask_threshold=1.5"], "mask_threshold"),
    ],
)
def test_bad_overrides_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("default", overrides)


def test_unknown_config_name_lists_known_ones():
    with pytest.raises(ConfigError, match="known: .*demo"):
        load_config("nope")


def test_config_file_path_is_accepted(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  epochs: 7\n")
    assert load_config(str(path)).train.epochs == 7
