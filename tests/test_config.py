"""The training config: defaults, YAML + ``--set`` overrides, one clear error naming the field (and file) for every
kind of mistake, the presets under configs/, the learning-rate schedule, and the ``tokenmdp train`` command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tokenmdp.cli import main
from tokenmdp.errors import TokenMDPError
from tokenmdp.train.config import TrainConfig, load_config, parse_override, resolve_algo, save_config
from tokenmdp.train.setup import lr_lambda

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_tiny_model_on_countdown_with_grpo():
    cfg = load_config()
    assert cfg.model.path is None and cfg.task.name == "countdown" and cfg.rollout.engine == "fast"
    assert cfg.algo.name == "grpo" and cfg.algo.overrides == {}
    spec = resolve_algo(cfg)
    assert spec.aggregation == "seq_mean_token_mean" and spec.kl_coef == 0.04


def test_yaml_and_set_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algo:\n  name: dr_grpo\n  clip_high: 0.28\noptim:\n  lr: 1e-5\nrun:\n  steps: 7\n")
    cfg = load_config(path, ["optim.lr=3e-4", "run.out=/x/y", "task.options={num_count: 3}", "algo.epochs=2",
                             "rollout.max_new_tokens=null", "optim.max_grad_norm=null", "run.log_samples=false"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.run.steps == 7 and cfg.run.out == "/x/y" and cfg.run.log_samples is False
    assert cfg.task.options == {"num_count": 3} and cfg.rollout.max_new_tokens is None
    assert cfg.algo.name == "dr_grpo" and cfg.algo.overrides == {"clip_high": 0.28, "epochs": 2}
    assert resolve_algo(cfg).clip_high == 0.28 and resolve_algo(cfg).epochs == 2
    assert load_config(path).optim.lr == pytest.approx(1e-5)  # YAML 1.1 reads 1e-5 as a string; we read a number
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


def test_round_trip_through_config_yaml(tmp_path):
    cfg = load_config(None, ["algo.name=ppo", "algo.lam=0.9", "run.seed=4", "optim.schedule=cosine"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and again.to_dict()["algo"] == {"name": "ppo", "lam": 0.9}


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], "unknown config field 'optim.lrr' in --set; expected one of: lr,"),
    (["modle.path=x"], "unknown config section 'modle'"),
    (["optim.lr=fast"], "config field 'optim.lr' in --set must be a number, got 'fast'"),
    (["run.steps=2.5"], "config field 'run.steps' in --set must be an integer, got 2.5"),
    (["run.device=tpu"], "config field 'run.device' in --set is 'tpu'; choose one of 'auto', 'cpu', 'cuda', 'mps'"),
    (["rollout.group_size=0"], "config field 'rollout.group_size' in --set must be at least 1, got 0"),
    (["rollout.top_p=1.5"], "'rollout.top_p'"),
    (["run.eval_every=-1"], "config field 'run.eval_every' in --set must be non-negative"),
    (["task.options=3"], "config field 'task.options' in --set must be a mapping"),
    (["algo.name=grpoo"], "config field 'algo.name' in --set is 'grpoo'; choose one of reinforce, rloo, grpo"),
    (["algo.klcoef=0.1"], "unknown config field 'algo.klcoef' in --set"),
    (["algo.aggregation=mean"], "'algo.aggregation'"),
    (["algo.epochs=0"], "'epochs'"),
    (["optim.lr"], "expected key=value"),
    (["run=3"], "config section 'run' in --set must be a mapping"),
])
def test_errors_name_the_field(overrides, message):
    with pytest.raises(TokenMDPError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_file_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 1e-4\n  warmup: 3\n")
    with pytest.raises(TokenMDPError, match=r"unknown config field 'optim.warmup' in .*bad.yaml"):
        load_config(path)
    path.write_text("optim:\n  lr: [1\n")
    with pytest.raises(TokenMDPError, match=r"bad.yaml line \d+: not valid YAML"):
        load_config(path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(TokenMDPError, match="must be a mapping of sections"):
        load_config(path)
    with pytest.raises(TokenMDPError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_file_loads(path, tmp_path):
    """Each file loads to the values written in it (every leaf, the algo overrides included), its algorithm
    resolves to the preset it names with those overrides applied, and the config round-trips through to_dict /
    from_dict and through config.yaml unchanged."""
    import dataclasses

    import yaml

    from tokenmdp.algos.presets import PRESETS

    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    spec = resolve_algo(cfg)
    assert raw["algo"]["name"] in PRESETS and cfg.algo.name == raw["algo"]["name"]
    overrides = {k: v for k, v in raw["algo"].items() if k != "name"}
    assert cfg.algo.overrides == overrides
    preset = PRESETS[cfg.algo.name]
    for f in dataclasses.fields(spec):  # the preset's fields, but for the file's overrides
        want = overrides.get(f.name, getattr(preset, f.name))
        assert getattr(spec, f.name) == pytest.approx(want) if isinstance(want, float) else \
            getattr(spec, f.name) == want, f.name
    loaded = cfg.to_dict()

    def leaves(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict) and value:
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    def at(tree, dotted):
        for part in dotted.split("."):
            tree = tree[part]
        return tree

    written = dict(leaves(raw))
    assert written, path
    for key, value in written.items():
        got = at(loaded, key)
        if isinstance(value, float):
            assert got == pytest.approx(value), key
        else:
            assert got == value, key
    assert TrainConfig.from_dict(loaded) == cfg
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_there_is_one_config_per_preset_and_a_gpu_example():
    from tokenmdp.algos.presets import PRESETS

    names = {load_config(p).algo.name for p in CONFIGS.glob("*.yaml")}
    assert set(PRESETS) <= names
    gpu = load_config(CONFIGS / "gpu-qwen2.5-0.5b-gsm8k-grpo.yaml")
    assert gpu.rollout.engine == "vllm" and gpu.run.mixed_precision == "bf16" and gpu.task.name == "gsm8k"


def test_learning_rate_schedule_hand_values():
    cosine = lr_lambda("cosine", 2, 6)
    assert [round(cosine(s), 3) for s in range(6)] == [0.5, 1.0, 1.0, 0.854, 0.5, 0.146]
    assert [lr_lambda("linear", 0, 4)(s) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert lr_lambda("constant", 1, 10)(9) == 1.0 and math.isclose(lr_lambda("constant", 4, 10)(0), 0.25)


def test_cli_lists_presets_and_reports_config_errors_in_one_line(capsys):
    assert main(["algos", "--json"]) == 0
    presets = json.loads(capsys.readouterr().out)
    assert {"grpo", "dr_grpo", "ppo", "isft+-", "dpo"} <= set(presets) and presets["dapo"]["clip_high"] == 0.28
    assert main(["train", "--list-algos"]) == 0
    assert "dr_grpo" in capsys.readouterr().out
    assert main(["train", "--set", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config field 'optim.lrr'") and err.count("\n") == 1
    assert main(["train", "--algo", "nope"]) == 2
    assert "'algo.name'" in capsys.readouterr().err
    assert main(["train", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


def test_cli_trains_and_resumes_a_run(tmp_path, tiny_random_dir, capsys):
    path = tmp_path / "c.yaml"
    cfg = TrainConfig.from_dict({
        "model": {"path": str(tiny_random_dir)},
        "task": {"template": "compact", "options": {"num_count": 3, "high": 20}},
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4},
        "run": {"steps": 1, "threads": 1},
    })
    save_config(cfg, path)
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--algo", "rloo", "--out", str(out), "--no-progress", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["run_dir"] == str(out) and doc["steps"] == 1 and doc["last"]["reward/accuracy"] == 0.0
    assert (out / "DONE").is_file() and load_config(out / "config.yaml").algo.name == "rloo"
    assert main(["train", "--config", str(path), "--algo", "rloo", "--out", str(out), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    # resume from the run folder alone, extending it by one step
    assert main(["train", "--resume", "--out", str(out), "--steps", "2", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2


def test_every_choice_field_lists_what_its_registry_has():
    """A setting's ``Literal`` choices are the names its registry knows: the engines, credit assignments,
    aggregations and KL estimators (one list in the types, checked against the code that serves them)."""
    import typing

    from tokenmdp.algos.core import AGGREGATIONS, KL_ESTIMATORS
    from tokenmdp.algos.presets import CHOICES
    from tokenmdp.mdp.credit import CREDIT
    from tokenmdp.rollout import ENGINES
    from tokenmdp.schema import literal_choices
    from tokenmdp.train.config import RolloutConfig

    assert literal_choices(typing.get_type_hints(RolloutConfig)["engine"]) == tuple(ENGINES)
    assert CHOICES["credit"] == tuple(CREDIT)
    assert CHOICES["aggregation"] == AGGREGATIONS == ("seq_mean_token_mean", "token_mean", "seq_sum_const",
                                                      "seq_mean_token_sum")
    assert CHOICES["kl_estimator"] == KL_ESTIMATORS == ("k1", "k2", "k3")


def test_a_lora_setting_turns_lora_on_and_a_contradiction_is_an_error(tmp_path):
    """``model.lora.rank`` without ``model.lora.enabled`` trains an adapter (as verl's LoRA rank does); with
    ``enabled: false`` beside a non-default value the setting would be ignored, so it is one clear error; the
    defaults written back by ``config.yaml`` round-trip."""
    cfg = load_config(None, ["model.lora.rank=8"])
    assert cfg.model.lora.enabled and cfg.model.lora.rank == 8 and cfg.model.lora.alpha == 32.0
    assert load_config(None, ["model.lora.alpha=4", "model.lora.target_modules=[q_proj]"]).model.lora.enabled
    assert not load_config(None, []).model.lora.enabled
    assert not load_config(None, ["model.lora.enabled=false", "model.lora.rank=16"]).model.lora.enabled
    with pytest.raises(TokenMDPError, match=r"config field 'model\.lora\.rank' in --set is 8 but "
                                            r"model\.lora\.enabled is false: set model\.lora\.enabled=true"):
        load_config(None, ["model.lora.enabled=false", "model.lora.rank=8"])
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  lora:\n    enabled: false\n    dropout: 0.1\n")
    with pytest.raises(TokenMDPError, match=r"'model\.lora\.dropout' in .*c\.yaml is 0\.1 but"):
        load_config(path)
    for config in (load_config(None, []), cfg):
        save_config(config, tmp_path / "config.yaml")
        assert load_config(tmp_path / "config.yaml") == config
