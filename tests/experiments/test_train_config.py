from __future__ import annotations

import pytest

from normmatters.experiments.config import ConfigError, TrainConfig, load_config, save_config


def test_yaml_roundtrip(tmp_path):
    cfg = TrainConfig(model="mlp", norm="topk", norm_options={"k": 4}, milestones=[2, 4], betas=(0.8, 0.9))
    save_config(cfg, tmp_path / "c.yaml")
    assert TrainConfig.from_dict(load_config(tmp_path / "c.yaml")) == cfg


def test_toml(tmp_path):
    (tmp_path / "c.toml").write_text('model = "vgg11"\nepochs = 3\n[norm_options]\nk = 2\n')
    cfg = TrainConfig.from_dict(load_config(tmp_path / "c.toml"))
    assert cfg.model == "vgg11" and cfg.epochs == 3 and cfg.norm_options == {"k": 2}


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key\(s\) \['learning_rate'\]"):
        (tmp_path / "c.yaml").write_text("learning_rate: 0.1\n")
        TrainConfig.from_dict(load_config(tmp_path / "c.yaml"), source=str(tmp_path / "c.yaml"))
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        TrainConfig(optimizer="lamb")
    with pytest.raises(ConfigError, match="epochs must be a positive int, got 0"):
        TrainConfig(epochs=0)
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: cannot parse"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="binary.yaml: cannot read it as text"):
        load_config(tmp_path / "binary.yaml")
