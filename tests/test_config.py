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


def test_sections_nest_as_ray_train_splits_its_configs():
    cfg = load_config(None, ["train.scaling.num_workers=2", "semantic.vllm.model=m", "eimf.experimental.lambda_item=0.5"])
    assert cfg.train.scaling.num_workers == 2 and cfg.train.failure.max_failures == 2
    assert cfg.semantic.vllm.model == "m" and cfg.semantic.openai.structured_output == "json_schema"
    assert cfg.eimf.experimental.lambda_item == 0.5 and cfg.eimf.experimental.ma_projection == "none"


def test_old_keys_load_as_the_new_ones_with_a_warning(tmp_path):
    from eimf.config import RENAMED

    with pytest.warns(FutureWarning, match="train.scaling.num_workers"):
        cfg = load_config(None, ["train.num_workers=2"])
    assert cfg.train.scaling.num_workers == 2
    f = tmp_path / "old.yaml"
    f.write_text("train:\n  zero_stage: 2\n  batch_size: 64\nsemantic:\n  vllm_model: m\n  max_concurrency: 7\n"
                 "eimf:\n  window_overlap: 0.5\n")
    with pytest.warns(FutureWarning) as seen:
        cfg = load_config(f)
    said = " ".join(str(w.message) for w in seen)
    for new in ("train.deepspeed.zero_stage", "semantic.vllm.model", "semantic.openai.max_concurrency",
                "eimf.experimental.window_overlap"):
        assert new in said
    assert (cfg.train.deepspeed.zero_stage, cfg.train.batch_size, cfg.semantic.vllm.model) == (2, 64, "m")
    assert cfg.semantic.openai.max_concurrency == 7 and cfg.eimf.experimental.window_overlap == 0.5
    # every old key names a setting that exists
    known = flatten(to_dict(load_config()))
    assert all(new in known for new in RENAMED.values()) and not any(old in known for old in RENAMED)


def test_a_bad_choice_is_one_line_naming_key_value_and_choices():
    from eimf.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.backbone=foo"])
    assert str(e.value) == "model.backbone must be one of comirec_sa, comirec_dr, mind, remi, got 'foo'"
    for override, words in [("train.deepspeed.zero_stage=5", ("train.deepspeed.zero_stage", "'5'", "0, 1, 2, 3")),
                            ("semantic.vllm.device=tpu", ("semantic.vllm.device", "'tpu'", "auto, cpu, gpu")),
                            ("eval.early_stop_metric=recall@10", ("eval.early_stop_metric", "recall@50")),
                            ("model.dimm=3", ("model.dimm", "model.dim"))]:
        with pytest.raises(ConfigError) as e:
            load_config(None, [override])
        assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_backbone_choices_are_the_model_registry():
    from eimf.config import BACKBONES
    from eimf.models import MODELS

    assert set(BACKBONES) == set(MODELS)


def test_the_batch_must_split_evenly_over_the_workers():
    from eimf.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.batch_size=128 must divide by train.scaling.num_workers=3"):
        load_config(None, ["train.scaling.num_workers=3"])
    assert load_config(None, ["train.scaling.num_workers=4"]).train.scaling.num_workers == 4
    assert load_config(None, ["train.scaling.num_workers=3", "train.batch_size=129"]).train.batch_size == 129


def test_nested_operational_fields_are_left_out_of_fingerprints():
    from eimf.config import operational_fields
    from eimf.pipeline import annotation_config, training_config

    assert {"scaling.placement_strategy", "failure.max_failures", "log_every"} <= set(
        operational_fields(load_config().train))
    base = load_config()
    ops = load_config(None, ["train.scaling.placement_strategy=SPREAD", "train.failure.max_failures=7",
                             "train.failure.restart_timeout_s=5", "semantic.vllm.concurrency=3",
                             "semantic.openai.max_concurrency=9", "semantic.vllm.timeout_s=10"])
    assert training_config(ops) == training_config(base) and training_config(ops, eimf=True) == training_config(
        base, eimf=True)
    assert annotation_config(ops) == annotation_config(base)
    assert "placement_strategy" not in training_config(base)["train"]["scaling"]
    assert "failure" in training_config(base)["train"] and not training_config(base)["train"]["failure"]
    # a field that changes the output still counts, nested too
    assert annotation_config(load_config(None, ["semantic.vllm.model=x"])) != annotation_config(base)
    assert training_config(load_config(None, ["train.scaling.num_workers=2"])) != training_config(base)
    assert training_config(load_config(None, ["eimf.experimental.lambda_item=0.1"]), eimf=True) != training_config(
        base, eimf=True)


def test_jobs_print_one_line_and_exit_2_on_a_config_error(capsys):
    import importlib.util
    import sys
    from pathlib import Path

    jobs = Path(__file__).resolve().parent.parent / "jobs"
    for job, argv in [("pipeline", ["--plan", "model.backbone=foo"]), ("experiments", ["model.backbone=foo"]),
                      ("train", None)]:
        spec = importlib.util.spec_from_file_location(f"job_{job}", jobs / f"{job}.py")
        mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclasses look it up there
        spec.loader.exec_module(mod)
        if argv is None:  # the jobs that are the eimf CLI
            from eimf.cli import main

            code = main(["train", "train.scaling.num_workers=3"])
        else:
            code = mod.main(argv)
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (job, err)
        assert ("model.backbone" in err and "'foo'" in err) or "train.scaling.num_workers=3" in err


def test_a_setting_or_data_error_in_a_worker_is_not_retried():
    """Ray Train retries worker errors; StopOnRepeatingError turns a ConfigError/DataError into a controller
    error (never retried) and repeating_error finds it again in what TorchTrainer.fit raises."""
    from ray.train import ControllerError

    from eimf.config import ConfigError
    from eimf.training.runner import StopOnRepeatingError, repeating_error

    stop = StopOnRepeatingError()
    stop.after_exception(None, {0: RuntimeError("node lost")})  # a transient one: Ray Train's policy decides
    with pytest.raises(ConfigError):
        stop.after_exception(None, {1: RuntimeError("collateral"), 0: ConfigError("model.x must be ...")})
    err = ConfigError("model.x must be ...")
    assert repeating_error(ControllerError(err)) is err and repeating_error(RuntimeError("x")) is None


def test_retrieval_nprobe_unset_means_a_share_of_the_cells(tmp_path):
    from eimf.config import ConfigError
    from eimf.evaluation.retrieval import MIN_NPROBE, default_nprobe

    cfg = load_config()
    assert cfg.retrieval.nprobe is None and cfg.retrieval.index == "auto"
    assert load_config(None, ["retrieval.nprobe=64"]).retrieval.nprobe == 64
    with pytest.raises(ConfigError, match="retrieval.nprobe must be >= 1"):
        load_config(None, ["retrieval.nprobe=0"])
    f = tmp_path / "c.yaml"
    f.write_text(to_yaml(cfg))
    assert load_config(f).retrieval.nprobe is None  # unset survives the YAML round trip
    assert default_nprobe("Flat") is None and default_nprobe("HNSW32") is None
    assert default_nprobe("IVF64,Flat") == MIN_NPROBE  # a small index keeps the old fixed default
    assert default_nprobe("IVF8,Flat") == 8  # never more cells than there are
    assert default_nprobe("MIPS,IVF12288,Flat") > default_nprobe("MIPS,IVF3072,Flat") > MIN_NPROBE
