import pytest
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from eimf.config import Config, flatten, load_config, to_dict, to_yaml


def test_defaults_match_design():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert (cfg.model.dim, cfg.model.num_interests, cfg.train.batch_size) == (64, 4, 128)
    assert cfg.data.split_seed == 1230 and cfg.data.split_ratios == [0.8, 0.1, 0.1]
    assert cfg.negatives.sampler == "log_uniform" and cfg.negatives.negatives_per_example == 10


def test_file_then_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  backbone: comirec_dr\n  dim: 32\ntrain:\n  seed: 5\n")
    cfg = load_config(f, ["train.seed=7", "data.dataset=amazon-beauty"])
    assert cfg.model.backbone == "comirec_dr" and cfg.model.dim == 32
    assert cfg.train.seed == 7  # the command line wins over the file
    assert cfg.data.dataset == "amazon-beauty"


def test_unknown_key_and_bad_type_fail_loudly():
    with pytest.raises((ConfigAttributeError, ConfigKeyError)):
        load_config(None, ["model.dimm=3"])
    with pytest.raises(ValidationError):
        load_config(None, ["model.dim=abc"])


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["model.num_interests=8"])
    f = tmp_path / "c.yaml"
    f.write_text(to_yaml(cfg))
    assert to_dict(load_config(f)) == to_dict(cfg)
    assert flatten({"a": {"b": 1}, "c": 2}) == {"a.b": 1, "c": 2}


def test_cli_says_which_setting_is_wrong_without_a_traceback(capsys):
    from eimf.cli import main

    assert main(["data", "prepare", "data.engine=bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eimf: error: data.engine must be one of auto, local, ray") and "Traceback" not in err
