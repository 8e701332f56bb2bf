"""The Hydra config tree: experiment values of the reference recipes (docs/reference.md), and
overrides reaching the model, the optimizer and the data."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from speakerlab.distributed import DistContext, single_process
from speakerlab.errors import ConfigError
from speakerlab.models import build_model, count_parameters
from speakerlab.training.builders import build_optimizer, model_spec, plain_config
from speakerlab.training.progress import TrainingMonitor
from speakerlab.training.schedules import MarginSchedule
from speakerlab.training.setup import Options
from speakerlab.training.trainer import Trainer

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

ERES2NET = {
    "model.name": "eres2net",
    "model.embedding_size": 192,
    "model.m_channels": 32,
    "model.feat_dim": 80,
    "data.num_mel_bins": 80,
    "data.crop_seconds": 3.0,
    "data.segment_seconds": 4.0,
    "data.speeds": [1.0, 0.9, 1.1],
    "data.augment_prob": 0.8,
    "data.snr_db": [0.0, 15.0],
    "loss.margin_type": "aam",
    "loss.scale": 32.0,
    "loss.num_classes": "auto",
    "loss.margin.initial": 0.0,
    "loss.margin.final": 0.3,
    "loss.margin.increase_start_epoch": 20,
    "loss.margin.fix_epoch": 50,
    "optim.lr": 0.2,
    "optim.min_lr": 5e-5,
    "optim.warmup_epochs": 5,
    "optim.momentum": 0.9,
    "optim.nesterov": True,
    "optim.weight_decay": 1e-4,
    "trainer.epochs": 70,
    "trainer.batch_size": 256,
    "trainer.init_from": None,
}
EXPERIMENTS = {
    "eres2net": ERES2NET,
    "eres2net_large": {**ERES2NET, "model.m_channels": 64},
    "eres2net_lm": {
        **ERES2NET,
        "trainer.epochs": 7,
        "data.crop_seconds": 6.0,
        "data.speeds": [1.0],
        "loss.num_classes": "init",
        "optim.lr": 1e-4,
        "optim.min_lr": 2e-5,
        "optim.warmup_epochs": 1,
        "trainer.batch_size": 128,
        "loss.margin.initial": 0.5,
        "loss.margin.final": 0.5,
        "loss.margin.increase_start_epoch": 0,
        "loss.margin.fix_epoch": 0,
        "trainer.init_from": "exp/eres2net",
    },
    "campplus": {
        **{k: v for k, v in ERES2NET.items() if k != "model.m_channels"},
        "model.name": "campplus",
        "model.embedding_size": 512,
        "trainer.epochs": 60,
        "optim.lr": 0.1,
        "optim.min_lr": 1e-4,
        "loss.margin.final": 0.2,
        "loss.margin.increase_start_epoch": 15,
        "loss.margin.fix_epoch": 25,
    },
    "ecapa_tdnn": {
        **{k: v for k, v in ERES2NET.items() if k != "model.m_channels"},
        "model.name": "ecapa_tdnn",
        "model.channels": [1024, 1024, 1024, 1024, 3072],
    },
}
# Parameter counts of the reference code (docs/reference.md).
PARAMETERS = {"eres2net": 6_610_688, "campplus": 7_176_224, "ecapa_tdnn": 20_767_552}


def compose_config(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_experiment_values_match_the_reference_recipe(experiment):
    cfg = compose_config(f"experiment={experiment}")
    assert cfg.name == experiment and cfg.exp_dir == f"exp/{experiment}"
    for key, expected in EXPERIMENTS[experiment].items():
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        assert (
            value == pytest.approx(expected) if isinstance(expected, float) else value == expected
        ), key


@pytest.mark.parametrize("experiment", sorted(PARAMETERS))
def test_experiment_models_have_the_reference_size(experiment):
    name, kwargs = model_spec(compose_config(f"experiment={experiment}").model)
    assert count_parameters(build_model(name, **kwargs)) == PARAMETERS[experiment]


def test_large_margin_finetune_keeps_margin_fixed():
    cfg = compose_config("experiment=eres2net_lm").loss.margin
    schedule = MarginSchedule(cfg.initial, cfg.final, cfg.increase_start_epoch, cfg.fix_epoch)
    assert {schedule(t) for t in (0.0, 0.5, 3.0, 7.0)} == {0.5}


def test_missing_train_dir_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"data.train_dir must be set"):
        plain_config(compose_config("experiment=eres2net"))


@pytest.mark.slow
def test_overrides_reach_model_optimizer_and_data(mini_data, tmp_path):
    cfg = plain_config(
        compose_config(
            "experiment=eres2net",
            f"data.train_dir={mini_data.train_dir}",
            f"exp_dir={tmp_path}",
            "optim.lr=0.1",
            "optim.momentum=0.5",
            "model.embedding_size=24",
            "model.m_channels=4",
            "data.crop_seconds=1.5",
            "data.speeds=[1.0]",
            "data.num_workers=0",
            "trainer.batch_size=4",
            "trainer.epochs=3",
            "optim.warmup_epochs=1",
            "optim.reference_batch=4",
        )
    )
    monitor = TrainingMonitor(tmp_path, enabled=False)
    try:
        run = Trainer.create(cfg, DistContext(0, 1, 0, torch.device("cpu")), monitor).run
    finally:
        monitor.close()
    # model: ERes2Net with the overridden width and embedding size
    assert run.model.conv1.weight.shape[0] == 4
    assert run.model(torch.randn(2, 100, 80)).shape == (2, 24)
    assert run.classifier.weight.shape == (12, 24)  # 12 speakers, one speed
    # optimizer and schedule
    group = run.optimizer.param_groups[0]
    assert group["momentum"] == 0.5 and group["nesterov"] and group["weight_decay"] == 1e-4
    assert run.lr_schedule.lr == 0.1 and run.lr_schedule(1.0) == pytest.approx(0.1)
    assert run.options.epochs == 3
    # data: 1.5 s crops give 148 frames
    features, label = run.dataset[0]
    assert features.shape == (148, 80) and 0 <= label < 12


def test_config_dir_adds_experiments_on_the_command_line(tmp_path, monkeypatch, capsys):
    from speakerlab.cli import main as cli_main

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - eres2net\nname: mine\ntrainer:\n  epochs: 3\n"
    )
    monkeypatch.setattr(
        "sys.argv",
        [
            "speakerlab",
            "train",
            "--config-dir",
            str(tmp_path),
            "experiment=mine",
            "optim.lr=0.05",
            "--cfg",
            "job",
        ],
    )
    cli_main()
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed.name == "mine" and printed.trainer.epochs == 3 and printed.optim.lr == 0.05
    assert printed.model.m_channels == 32 and printed.loss.margin.fix_epoch == 50  # from eres2net


def test_optimizer_is_chosen_by_the_optim_group():
    net = torch.nn.Linear(4, 2)
    adamw = build_optimizer(net.parameters(), compose_config("optim=adamw").optim, 0.01)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["betas"] == (0.9, 0.999) and adamw.param_groups[0]["lr"] == 0.01
    sgd = build_optimizer(net.parameters(), compose_config().optim, 0.1)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"]
    with pytest.raises(ConfigError, match="optim.name='lamb': choose one of sgd, adamw"):
        build_optimizer(net.parameters(), compose_config("optim.name=lamb").optim, 0.1)


def test_mini_experiment_is_a_shallow_narrow_eres2net_with_adamw():
    cfg = compose_config("experiment=eres2net_mini")
    name, kwargs = model_spec(cfg.model)
    assert name == "eres2net" and kwargs["num_blocks"] == [1, 1, 1, 1] and kwargs["m_channels"] == 8
    assert count_parameters(build_model(name, **kwargs)) < 400_000
    assert cfg.optim.name == "adamw" and cfg.data.speeds == [1.0]


def test_a_run_that_would_prune_what_its_export_averages_is_refused_at_start():
    """Guards against: a run keeping 3 checkpoints whose export averages 5 failing only at
    stage 4, after hours of training."""
    cfg = compose_config("trainer.keep_last=3", "trainer.export_average=5")
    with pytest.raises(ConfigError, match=r"export_average=5 .* trainer.keep_last=3 keeps only 3"):
        Options.from_config(cfg, single_process("cpu"))
