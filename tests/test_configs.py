"""The experiment configs: what each experiment sets on top of its config groups.

``tests/fixtures/expected/experiment_deltas.yaml`` was written from the tree before the experiments
were rewritten with defaults-list inheritance (see tests/fixtures/README.md): for every experiment,
the plain groups of its model, loss and optimizer, and every value of its merged config that
differs from those groups. The plain group files were not changed by that rewrite, so equal deltas
mean equal merged configs, however an experiment now reaches its values (a parent experiment, a
group variant such as ``data: mini``). Comparing deltas (not whole configs) lets a group file gain
or change a value that no experiment sets without touching this expectation. Experiments added
since are tested by their behaviour (tests/test_recipe.py) and values (test_training_config.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from speakerlab.models import build_model, count_parameters

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
EXPECTED = ROOT / "tests" / "fixtures" / "expected" / "experiment_deltas.yaml"


def experiment_names() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every leaf (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(leaves(value, f"{prefix}{key}."))
    return {k.rstrip("."): v for k, v in out.items()}


def merged_and_plain(experiment: str) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
    """The plain groups of ``experiment`` (named by its model.name, loss.margin_type and
    optim.name; data and trainer at their defaults), and the leaves of its merged config and of
    those plain groups."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        merged = compose("config", [f"experiment={experiment}"])
        groups = {
            "model": merged.model.name,
            "loss": merged.loss.margin_type,
            "optim": merged.optim.name,
        }
        plain = compose("config", [f"{group}={name}" for group, name in groups.items()])
    return (
        groups,
        leaves(OmegaConf.to_container(merged, resolve=False)),
        leaves(OmegaConf.to_container(plain, resolve=False)),
    )


def experiment_delta(experiment: str) -> dict[str, Any]:
    """The plain groups of ``experiment`` and the values it sets beyond them."""
    groups, got, plain = merged_and_plain(experiment)
    sets = {k: v for k, v in got.items() if k not in plain or plain[k] != v}
    unset = sorted(k for k in plain if k not in got)
    return {"groups": groups, "sets": sets, "unset": unset}


EXPECTED_DELTAS = yaml.safe_load(EXPECTED.read_text())


@pytest.mark.parametrize("experiment", sorted(EXPECTED_DELTAS))
def test_experiment_sets_what_it_set_before_inheritance(experiment):
    assert experiment in experiment_names()
    assert experiment_delta(experiment) == EXPECTED_DELTAS[experiment]


@pytest.mark.parametrize("experiment", experiment_names())
def test_experiment_sets_only_keys_its_groups_declare(experiment):
    """A misspelt key (``trainer.epoch: 9``) would merge silently and change nothing."""
    _, got, plain = merged_and_plain(experiment)
    assert [k for k in got if k not in plain] == []


def model_spec(model_cfg) -> tuple[str, dict[str, Any]]:
    kwargs = OmegaConf.to_container(model_cfg, resolve=True)
    return kwargs.pop("name"), kwargs


def compose_experiment(experiment: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", [f"experiment={experiment}"])


@pytest.mark.parametrize("experiment", ["campplus_mini", "ecapa_tdnn_mini"])
def test_mini_experiments_differ_from_eres2net_mini_only_in_the_model(experiment):
    """The published table in miniature: three models trained the same way."""
    mini, reference = compose_experiment(experiment), compose_experiment("eres2net_mini")
    for group in ("data", "loss", "optim", "trainer"):
        assert mini[group] == reference[group], group
    name, kwargs = model_spec(mini.model)
    assert name == experiment.removesuffix("_mini")
    assert count_parameters(build_model(name, **kwargs)) < 1_000_000


def test_mini_large_margin_experiment_fine_tunes_the_mini_model():
    """Stage 6 after the mini recipe loads the eres2net_mini weights: same architecture."""
    lm, base = compose_experiment("eres2net_lm_mini"), compose_experiment("eres2net_mini")
    assert model_spec(lm.model) == model_spec(base.model)
    assert lm.trainer.init_from == f"exp/{base.name}" and lm.loss.num_classes == "init"
    assert lm.loss.margin.initial == lm.loss.margin.final > base.loss.margin.final
    assert lm.data.crop_seconds > base.data.crop_seconds and lm.optim.lr < base.optim.lr


if __name__ == "__main__":  # writes the expectation: only ever from a tree whose configs are right
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_configs.py --write")
    deltas = {name: experiment_delta(name) for name in experiment_names()}
    EXPECTED.write_text(yaml.safe_dump(deltas, sort_keys=True, width=100))
