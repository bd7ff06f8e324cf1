"""Config: inheritance, overrides, clear errors, shipped recipes."""
import glob
import os
import subprocess
import sys

import pytest

from trainer.config import ConfigError, load_config, to_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "configs")


def test_shipped_recipes_resolve():
    files = sorted(glob.glob(os.path.join(CONFIGS, "*.yaml")))
    names = {os.path.basename(f) for f in files}
    for ds in ("ms1mv2", "ms1mv3", "glint360k", "webface42m"):
        for b in ("r50", "r100"):
            for loss in ("", "_cosface"):
                for u in ("", "_unpg"):
                    assert f"{ds}_{b}{loss}{u}.yaml" in names
    assert "synth_demo.yaml" in names
    for f in files:
        load_config(f)  # every shipped file type-checks
    c = load_config(os.path.join(CONFIGS, "ms1mv3_r100_unpg.yaml"))
    assert (c.model.backbone, c.loss.margin, c.loss.m, c.loss.unpg, c.loss.wisk) == ("r100", "arcface", 0.5, True, 1.5)
    assert c.data.num_classes == 93431 and c.optim.lr == 0.1 and c.data.batch_size == 128
    c = load_config(os.path.join(CONFIGS, "webface42m_r50_cosface.yaml"))
    assert (c.model.backbone, c.loss.margin, c.loss.m, c.loss.unpg, c.loss.sample_rate) == (
        "r50",
        "cosface",
        0.4,
        False,
        0.2,
    )


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 0.5\n  momentum: 0.8\nmodel:\n  backbone: r18\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\noptim:\n  lr: 0.2\n")
    c = load_config(tmp_path / "child.yaml", ["optim.weight_decay=0.001", "validation.targets=[lfw, agedb_30]",
                                               "run.max_steps=7"])
    assert (c.optim.lr, c.optim.momentum, c.model.backbone) == (0.2, 0.8, "r18")
    assert c.optim.weight_decay == 0.001 and c.validation.targets == ["lfw", "agedb_30"] and c.run.max_steps == 7
    assert "lr: 0.2" in to_yaml(c)


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*valid keys: .*\blr\b.*momentum"):
        load_config(None, ["optim.lrr=0.1"])
    (tmp_path / "bad.yaml").write_text("modle:\n  backbone: r50\n")
    with pytest.raises(ConfigError, match=r"'modle'.*valid keys: .*model"):
        load_config(tmp_path / "bad.yaml")


def test_wrong_types_and_values():
    with pytest.raises(ConfigError, match=r"'optim.lr': expected float, got 'fast'"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"'data.batch_size': expected int"):
        load_config(None, ["data.batch_size=1.5"])
    with pytest.raises(ConfigError, match=r"'engine.name'.*not one of"):
        load_config(None, ["engine.name=horovod"])
    with pytest.raises(ConfigError, match=r"model.backbone.*valid: .*r100"):
        load_config(None, ["model.backbone=vgg"])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(None, ["optim.lr"])


def test_cli_reports_bad_key_and_exits_2():
    r = subprocess.run([sys.executable, "-m", "trainer.train", os.path.join(CONFIGS, "synth_demo.yaml"),
                        "optim.lrr=1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "unknown config key 'optim.lrr'" in r.stderr and "valid keys" in r.stderr


def test_old_flat_key_names_its_new_place():
    with pytest.raises(ConfigError, match=r"unknown config key 'save_every' \(moved to 'checkpoint.save_every'\)"):
        load_config(None, ["save_every=5"])
    with pytest.raises(ConfigError, match=r"'model.backbone_kwargs' \(moved to 'model.width"):
        load_config(None, ["model.backbone_kwargs={width: 8}"])
    with pytest.raises(ConfigError, match=r"'engine' is now a section; the old key moved to 'engine.name'"):
        load_config(None, ["engine=deepspeed"])


def test_sections_are_typed_including_augment():
    c = load_config(None, ["data.augment.blur_prob=0.5", "engine.deepspeed.zero_stage=2"])
    assert c.data.augment.blur_prob == 0.5 and c.engine.deepspeed.zero_stage == 2
    with pytest.raises(ConfigError, match="data.augment.blur_prob"):
        load_config(None, ["data.augment.blur_prob=often"])
    with pytest.raises(ConfigError, match="unknown config key 'data.augment.sharpen'"):
        load_config(None, ["data.augment.sharpen=1"])


@pytest.mark.parametrize("override, key", [
    ("run.max_steps=0", "run.max_steps"), ("run.max_steps=-3", "run.max_steps"),
    ("run.num_epochs=0", "run.num_epochs"), ("run.max_skips=-1", "run.max_skips"),
    ("checkpoint.save_every=-5", "checkpoint.save_every"), ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("optim.clip_grad_norm=-1", "optim.clip_grad_norm"), ("loss.s=0", "loss.s"), ("loss.s=-64", "loss.s"),
    ("loss.m=-0.5", "loss.m"), ("loss.margin_list=[1.0,-0.5,0.0]", "loss.margin_list"),
    ("loss.margin_list=[0,0.5,0.0]", "loss.margin_list"), ("loss.wisk=-1", "loss.wisk"),
    ("optim.lr=0", "optim.lr"), ("optim.lr=-0.1", "optim.lr"), ("optim.head_lr=0", "optim.head_lr"),
    ("optim.momentum=1.5", "optim.momentum"), ("optim.weight_decay=-1e-4", "optim.weight_decay"),
    ("optim.min_lr=0.5", "optim.min_lr"), ("optim.power=-1", "optim.power"), ("model.dropout=1", "model.dropout"),
    ("validation.every=-1", "validation.every"), ("logging.hist_every=-1", "logging.hist_every"),
    ("data.num_threads=0", "data.num_threads"), ("data.num_classes=1", "data.num_classes"),
    ("model.width=0", "model.width"), ("run.seed=-1", "run.seed"), ("run.seed=4294967296", "run.seed"),
    ("optim.betas=[0.9]", "optim.betas"), ("loss.t_alpha=0", "loss.t_alpha"), ("loss.u_a=5", "loss.u_a"),
    ("data.block_bytes=0", "data.block_bytes"), ("optim.betas=[0.9,1.5]", "optim.betas"),
    ("optim.lr=.nan", "optim.lr"), ("run.preempt_signals=[SIGKILL]", "run.preempt_signals"),
    ("run.preempt_signals=[SIGNOPE]", "run.preempt_signals"),
    ("data.lock_timeout=0", "data.lock_timeout"), ("data.lock_timeout=.inf", "data.lock_timeout"),
])
def test_numeric_ranges_are_checked(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_numbers_written_as_yaml_strings_are_accepted():
    c = load_config(None, ["optim.lr=1e-3", "optim.weight_decay=5E-4", "loss.s=6.4e1", "optim.head_lr=+2e-2"])
    assert (c.optim.lr, c.optim.weight_decay, c.loss.s, c.optim.head_lr) == (1e-3, 5e-4, 64.0, 0.02)
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(None, ["optim.lr=fast"])
    c = load_config(None, ["run.preempt_signals=[SIGUSR2]", "run.max_skips=0", "checkpoint.save_every=0"])
    assert c.run.preempt_signals == ["SIGUSR2"]


@pytest.mark.parametrize("override, message", [
    ("run.output=", r"run\.output' must be a folder"),
    ("run.output=' '", r"run\.output' must be a folder"),
    ("optim.lr=1e6", r"optim\.lr' must be <= 10"),
    ("optim.head_lr=100", r"optim\.head_lr' must be <= 10"),
    ("optim.lr=0x10", r"optim\.lr=0x10': '0x10' is not a decimal number \(YAML would read it as 16\)"),
    ("run.seed=010", r"'010' is not a decimal number"),
    ("run.max_steps=1_000", r"'1_000' is not a decimal number"),
])
def test_silent_odds_are_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_non_decimal_numbers_in_a_file_name_the_file(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 0x10\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: '0x10' is not a decimal number"):
        load_config(tmp_path / "c.yaml")
    assert load_config(None, ["run.max_steps=1000", "run.seed=-0"]).run.max_steps == 1000


def test_section_names_agree_with_the_registries():
    """The torch-free name lists the sections check are exactly what the components register."""
    from trainer.backbones import BACKBONES, available_backbones
    from trainer.heads import MARGINS, STATE_DTYPE_NAMES, STATE_DTYPES, available_margins

    assert sorted(BACKBONES) == available_backbones()
    assert sorted(MARGINS) == list(available_margins())
    assert tuple(STATE_DTYPES) == STATE_DTYPE_NAMES


def test_registries_refuse_a_name_the_config_does_not_know():
    from trainer.backbones import register_backbone
    from trainer.heads import register_margin

    with pytest.raises(ValueError, match="BACKBONES"):
        register_backbone("r999")
    with pytest.raises(ValueError, match="MARGINS"):
        register_margin("sphereface")


def test_a_section_checks_itself_when_built_directly():
    """One place per rule: the section's own __post_init__, also without load_config."""
    from trainer.engine.config import EngineConfig
    from trainer.heads.config import LossConfig
    from trainer.optim import OptimConfig

    with pytest.raises(ConfigError, match="'loss.sample_rate' must be in"):
        LossConfig(sample_rate=0.0)
    with pytest.raises(ConfigError, match="'optim.lr' must be > 0"):
        OptimConfig(lr=0.0)
    with pytest.raises(ConfigError, match=r"'engine.name': 'ds' is not one of \['ddp', 'deepspeed'\]"):
        EngineConfig(name="ds")
