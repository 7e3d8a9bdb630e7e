"""Every YAML under experiments/configs parses and instantiates (model, data, trainer)."""

from pathlib import Path

import pytest
import yaml

from flowtext.lm import FlowLM
from flowtext.regime import TrainingRegime
from flowtext.training import cli_main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "experiments" / "configs").glob("*.yaml"))


def test_the_three_tiny_configs_exist():
    assert {"evo-tiny", "ar-tiny", "diffusion-tiny"} <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_instantiates(path, tmp_path):
    cli = cli_main(["--config", str(path), f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert isinstance(cli.model, FlowLM)
    # the tokenizer's vocabulary and bytes/token were linked into the model
    assert cli.model.net.config.vocab_size == cli.datamodule.vocab_size
    assert cli.model.bytes_per_token == pytest.approx(cli.datamodule.bytes_per_token)
    assert cli.datamodule.seq_len <= cli.model.net.config.max_len


def test_unknown_option_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["--config", str(CONFIGS[0]), "--model.init_args.no_such_option=3"], run=False)


@pytest.mark.parametrize(
    "name, preset",
    [("ar-tiny", "autoregressive"), ("diffusion-tiny", "diffusion"), ("evo-tiny", "evo")],
)
def test_a_tiny_config_spells_out_its_modules_default_regime(name, preset):
    """The comment "TrainingRegime.<preset>(), spelled out" stays true when a preset changes."""
    path = next(p for p in CONFIGS if p.stem == name)
    text = path.read_text()
    assert f"TrainingRegime.{preset}(), spelled out" in text
    regime = yaml.safe_load(text)["model"]["init_args"]["regime"]
    assert TrainingRegime(**regime) == getattr(TrainingRegime, preset)()
