"""Configs are code (core.config): targets outside the project, torch.nn/optim and lightning are refused
before anything is imported unless the user allows them; wrong parameters are one line naming them."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from core import trainer as main
from core.config import ALLOW_ENV, instantiate_from_config
from tests.main_helpers import DREAMBOOTH_TINY, base_checkpoint, make_images

UNET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
UNET_PARAMS = dict(in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1, attention_resolutions=[1],
                   channel_mult=[1], num_heads=2, context_dim=16)


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """A module whose import leaves a marker file (code running at import time)."""
    marker = tmp_path / "ran"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Boom:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return marker


def test_a_target_outside_the_project_is_refused_before_its_import(evil_module, monkeypatch):
    with pytest.raises(ValueError, match=f"refused .*{ALLOW_ENV}=evilmod"):
        instantiate_from_config({"target": "evilmod.Boom"})
    assert not evil_module.exists()
    for target in ("os.system", "subprocess.Popen", "builtins.eval"):
        with pytest.raises(ValueError, match="not a class of this project"):
            instantiate_from_config({"target": target, "params": {"command": "true"}})
    with pytest.raises(ValueError, match="'torch.nn.functional.relu' is not a class"):
        instantiate_from_config({"target": "torch.nn.functional.relu"})
    monkeypatch.setenv(ALLOW_ENV, "evilmod")  # the user's leave, outside the config
    assert type(instantiate_from_config({"target": "evilmod.Boom"})).__name__ == "Boom" and evil_module.exists()


def test_a_parameter_the_class_does_not_take_or_of_the_wrong_type_is_one_line():
    assert instantiate_from_config({"target": UNET, "params": UNET_PARAMS}).model_channels == 32
    cases = [({"foo": 1}, "UNetModel: .*unexpected keyword argument 'foo'"),
             ({"model_channels": "abc"}, "UNetModel: model_channels='abc' is not int"),
             ({"use_checkpoint": "yes"}, "use_checkpoint='yes' is not bool"),
             ({"dropout": "0.1"}, "dropout='0.1' is not float")]
    for change, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            instantiate_from_config({"target": UNET, "params": {**UNET_PARAMS, **change}})
        assert "\n" not in str(err.value)
    assert instantiate_from_config({"target": UNET, "params": {**UNET_PARAMS, "dropout": 0}}).model_channels == 32
    with pytest.raises(ValueError, match="torch.nn.Linear: .*missing 1 required positional argument"):
        instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 2}})


def test_trainer_settings_are_checked():
    assert main.trainer_kwargs(OmegaConf.create({"lightning": {}})) == {}  # no lightning.trainer: defaults
    for trainer, message in [({"max_steps": "abc"}, "max_steps='abc' is not int"),
                             ({"max_steps": 0}, "max_steps=0: expected a positive number"),
                             ({"benchmark": "yes"}, "benchmark='yes' is not bool or null")]:
        with pytest.raises(ValueError, match=message):
            main.trainer_kwargs(OmegaConf.create({"lightning": {"trainer": trainer}}))
    with pytest.raises(ValueError, match="expected a mapping of Trainer arguments"):
        main.trainer_kwargs(OmegaConf.create({"lightning": {"trainer": 5}}))


def test_main_py_refuses_bad_configs_in_one_line(tmp_path, capsys):
    base, images = base_checkpoint(tmp_path / "base.ckpt"), make_images(tmp_path / "instance", 2)
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"model:\n  target: os.system\n  params:\n    command: touch {tmp_path / 'pwned'}\n"
                    f"data:\n  target: os.system\n  params:\n    command: touch {tmp_path / 'pwned'}\n")
    args = ["-t", "--actual_resume", str(base), "--data_root", str(images), "-l", str(tmp_path / "logs")]
    cases = [(["--base", str(evil)], "target 'os.system': not a class of this project"),
             (["--base", str(DREAMBOOTH_TINY), "model.params.unet_config.params.model_channels=abc"],
              "model_channels='abc' is not int"),
             (["--base", str(DREAMBOOTH_TINY), "model.params.unet_config.params.channel_multt=[1]"],
              "unexpected keyword argument 'channel_multt'"),
             (["--base", str(DREAMBOOTH_TINY), "lightning.trainer.max_steps=abc"], "max_steps='abc' is not int"),
             (["--base", str(DREAMBOOTH_TINY), "model.base_learning_rate=0"], "base_learning_rate=0: expected a number > 0"),
             (["--base", str(DREAMBOOTH_TINY), "model.base_learning_rate=-1e-6"], "expected a number > 0")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for extra, message in cases:
            code = main.main(args + extra)
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(err) == 1 and message in err[0], (extra, err)
    finally:
        torch.set_num_threads(threads)
    assert not (tmp_path / "pwned").exists()
