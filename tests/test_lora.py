"""LoRA: our adapters (ldm.modules.lora), DreamBooth's ``lora:``, the three export formats
(ldm.lora_export, scripts/export_lora.py) and ``sample.py --lora``, with diffusers + peft as the oracle."""
import importlib.util
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.loaders import single_file_utils as sfu
from omegaconf import OmegaConf
from PIL import Image
from safetensors import safe_open

from core.config import instantiate_from_config
from core.weights import CheckpointError, load_state_dict, save_checkpoint
from ldm.callbacks.export import ExportOnTrainEnd
from ldm.export import diffusers_pipeline
from ldm.loading import load_model
from ldm.lora_export import (DOWN, UP, diffusers_unet_path, kohya_state_dict, merge_kohya, merged_state_dict,
                             unet_num_res_blocks)
from ldm.modules.lora import (UNET_ATTENTION, UNET_FEED_FORWARD, UNET_PROJECTIONS, UNET_RESBLOCK, inject_lora,
                              lora_layers, lora_parameters)
from tests._util import randomize_, rel_err
from tests.sd_fixtures import FULL_CONFIG, ROOT, TINY_CONFIG, plain, tiny_config, tiny_model

TINY_DB = ROOT / "configs" / "toy" / "dreambooth-tiny.yaml"
ALL_UNET = UNET_ATTENTION + UNET_FEED_FORWARD + UNET_PROJECTIONS + UNET_RESBLOCK
LORA = {"rank": 3, "alpha": 5.0, "text_encoder": True, "unet_targets": list(ALL_UNET)}
PROMPTS = ["a photo of sks dog", "a dog on the beach"]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_lora, sample = _script("export_lora"), _script("sample")


def db_config(**lora):
    cfg = OmegaConf.load(TINY_DB)
    cfg.model.params.lora = {**LORA, **lora}
    return cfg


def lora_model(seed: int = 1, **lora):
    """The tiny DreamBooth with adapters, every weight random (the adapters' up weights too)."""
    model = instantiate_from_config(db_config(**lora).model)
    return randomize_(model, seed=seed, scale=0.1).eval()


def base_state(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if not k.endswith((DOWN, UP))}


def outputs(model, text_encoder=None, tokenizer=None):
    """(eps of fixed inputs, text features of PROMPTS) of our model, or of a diffusers UNet and text
    encoder (``tokenizer``: our model, whose tokens they read)."""
    gen = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=gen)
    ids = (tokenizer or model).cond_stage_model.tokenize(PROMPTS)
    with torch.no_grad():
        if text_encoder is None:
            return model.apply_model(x, t, c), model.cond_stage_model.transformer(ids)
        return model(x, t, encoder_hidden_states=c).sample, text_encoder(ids).last_hidden_state


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A LoRA model, its training-style checkpoint and config, and the three exports of it."""
    folder = tmp_path_factory.mktemp("lora")
    model = lora_model()
    save_checkpoint({"state_dict": model.state_dict(), "global_step": 3}, folder / "last.ckpt")
    OmegaConf.save(db_config(), folder / "project.yaml")
    files = {f: folder / f"{f}.safetensors" for f in ("kohya", "peft", "merged")}
    assert export_lora.main([str(folder / "last.ckpt"), "--config", str(folder / "project.yaml"),
                             *[a for f, p in files.items() for a in (f"--{f}", str(p))]]) == 0
    save_checkpoint(base_state(model), folder / "base.safetensors")
    return SimpleNamespace(model=model, folder=folder, **files)


# ---- adapters ------------------------------------------------------------------------------------
def test_adapters_keep_the_base_keys_start_at_the_base_and_only_they_train():
    model = tiny_model(seed=2)
    unet = model.model.diffusion_model
    before, eps = unet.state_dict(), outputs(model, None)[0]
    names = inject_lora(unet, ALL_UNET, rank=4, alpha=8)
    after = unet.state_dict()
    assert set(before) < set(after) and all(k.endswith((DOWN, UP)) for k in set(after) - set(before))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(outputs(model, None)[0], eps)  # up = 0: the adapted model is its base
    assert len(names) == len(lora_layers(unet)) and {n.rsplit(".", 1)[-1] for n in names} >= {"to_q", "proj_in"}
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(unet)}
    assert all(isinstance(p, torch.nn.Parameter) for p in trainable) and len(trainable) == 2 * len(names)


@pytest.mark.parametrize("kwargs,message", [
    ({"rank": 0}, "rank must be a positive integer, got 0"), ({"rank": -2}, "rank must be a positive integer"),
    ({"alpha": 0}, "alpha must be a number > 0"), ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"targets": ["to_x"]}, "LoRA target 'to_x' matches no module"),
    ({"targets": ["in_layers.2"]}, "is a Conv2d: only nn.Linear and 1x1 nn.Conv2d"),
])
def test_bad_adapter_arguments_are_refused(kwargs, message):
    unet = tiny_model().model.diffusion_model
    args = {"targets": UNET_ATTENTION, "rank": 4, "alpha": 4.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        inject_lora(unet, **args)


# ---- names ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [TINY_CONFIG, FULL_CONFIG], ids=["tiny", "sd-v1"])
def test_diffusers_names_are_those_of_diffusers_own_converter(config):
    """Every tensor of the UNet, tagged with its index, lands under our name after
    ``convert_ldm_unet_checkpoint`` (the full-size UNet is built on the meta device)."""
    cfg = OmegaConf.load(config)
    with torch.device("meta"):
        unet = instantiate_from_config(cfg.model.params.unet_config)
    shapes = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    tagged = {k: torch.full((1,), float(i)) for i, k in enumerate(shapes)}
    converted = sfu.convert_ldm_unet_checkpoint(tagged, sfu.create_unet_diffusers_config_from_ldm(plain(cfg), shapes))
    theirs = {int(v.item()): k for k, v in converted.items()}
    nrb = unet_num_res_blocks(shapes)
    assert nrb == cfg.model.params.unet_config.params.num_res_blocks
    ours = {i: diffusers_unet_path(k.removeprefix("model.diffusion_model."), nrb) for i, k in enumerate(shapes)}
    assert ours == theirs


# ---- formats -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_diffusers_load_lora_weights_gives_our_adapted_outputs(run, fmt):
    pipe = diffusers_pipeline(base_state(run.model), plain(db_config()))
    base_eps, base_text = outputs(pipe.unet, pipe.text_encoder, run.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(getattr(run, fmt)))
    eps, text = outputs(pipe.unet, pipe.text_encoder, run.model)
    ours_eps, ours_text = outputs(run.model, None)
    assert rel_err(eps, ours_eps) < 1e-5 and rel_err(text, ours_text) < 1e-5
    assert rel_err(base_eps, ours_eps) > 1e-2 and rel_err(base_text, ours_text) > 1e-2  # the adapters matter


def test_the_kohya_file_has_kohya_names_and_alpha(run):
    with safe_open(str(run.kohya), "pt") as f:
        keys, alpha = set(f.keys()), f.get_tensor(
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha")
        meta = f.metadata()
    assert alpha.item() == 5.0 and meta["ss_network_dim"] == "3"
    assert "lora_unet_up_blocks_1_resnets_0_conv_shortcut.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight" in keys
    assert len(keys) == 3 * len(lora_layers(run.model))


def test_the_merged_file_loads_strictly_and_gives_the_adapted_outputs(run):
    merged = load_model(tiny_config(), run.merged)
    for ours, theirs in zip(outputs(merged, None), outputs(run.model, None)):
        assert rel_err(ours, theirs) < 1e-5
    assert rel_err(outputs(load_model(tiny_config(), run.folder / "base.safetensors"), None)[0],
                   outputs(run.model, None)[0]) > 1e-2


def test_merge_kohya_into_the_base_is_the_merged_file_scaled(run):
    model = load_model(tiny_config(), run.folder / "base.safetensors")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    assert merge_kohya(model, run.kohya, scale=0.5) == len(lora_layers(run.model))
    merged = load_state_dict(run.merged)
    for key, w in model.state_dict().items():
        torch.testing.assert_close(w, base[key] + 0.5 * (merged[key] - base[key]), rtol=0, atol=1e-6)


def test_a_lora_for_another_base_is_refused_naming_the_file_and_key(run, tmp_path):
    wider = load_model(tiny_config(**{"model.params.cond_stage_config.params.width": 48}), None)
    wrong = rf"{run.kohya}: does not fit the model's LoRA layout: wrong shapes \d+ \(lora_te_"
    with pytest.raises(CheckpointError, match=wrong):
        merge_kohya(wider, run.kohya)
    other = {**load_state_dict(run.kohya), "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight":
             torch.zeros(3, 32, 1, 1), "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight":
             torch.zeros(32, 3, 1, 1)}
    save_checkpoint(other, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=r"other.safetensors: does not fit the model's LoRA layout: unexpected keys 1 "
                                              r"\(lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight\)"):
        merge_kohya(load_model(tiny_config(), None), tmp_path / "other.safetensors")
    save_checkpoint({"lora_unet_x.weight": torch.zeros(1)}, tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match="odd.safetensors: key 'lora_unet_x.weight' is not a kohya LoRA key"):
        merge_kohya(load_model(tiny_config(), None), tmp_path / "odd.safetensors")


# ---- sample.py --lora ----------------------------------------------------------------------------
def _sample(tmp_path, name, *args) -> np.ndarray:
    argv = ["--config", str(TINY_CONFIG), "--device", "cpu", "--precision", "full", "--prompt", PROMPTS[0],
            "--H", "16", "--W", "16", "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--skip_grid",
            "--outdir", str(tmp_path / name), *map(str, args)]
    assert sample.main(argv) == 0
    return np.asarray(Image.open(tmp_path / name / "samples" / "00000.png"))


def test_sample_py_with_lora_samples_as_the_merged_file(run, tmp_path, capsys):
    with_lora = _sample(tmp_path, "lora", "--ckpt", run.folder / "base.safetensors", "--lora", run.kohya)
    assert np.array_equal(with_lora, _sample(tmp_path, "merged", "--ckpt", run.merged))
    assert not np.array_equal(with_lora, _sample(tmp_path, "base", "--ckpt", run.folder / "base.safetensors"))
    wider = OmegaConf.load(TINY_CONFIG)
    wider.model.params.cond_stage_config.params.width = 48
    OmegaConf.save(wider, tmp_path / "wider.yaml")
    capsys.readouterr()
    argv = ["--config", str(tmp_path / "wider.yaml"), "--random_init", "--device", "cpu", "--lora", str(run.kohya),
            "--H", "16", "--W", "16", "--outdir", str(tmp_path / "o")]
    assert sample.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(run.kohya) in err and "lora_te_" in err


# ---- DreamBooth ----------------------------------------------------------------------------------
def test_dreambooth_lora_trains_only_the_adapters():
    model = lora_model().train()
    unet, text = model.model.diffusion_model, model.cond_stage_model.transformer
    adapters = lora_parameters(unet) + lora_parameters(text)
    grouped = [p for g in model.param_groups() for p in g["params"]]
    assert {id(p) for p in grouped} == {id(p) for p in adapters} and len(grouped) == len(adapters)
    assert {g["name"] for g in model.param_groups()} == {"unet", "text_encoder"}
    part = {"image": torch.rand(1, 32, 32, 3) * 2 - 1, "caption": PROMPTS[:1]}
    model.denoising_losses(part)[0].backward()
    assert all(p.grad is not None for p in adapters)
    assert all(p.grad is None for p in model.parameters() if id(p) not in {id(a) for a in adapters})


def test_dreambooth_without_lora_is_the_full_fine_tuning_of_before():
    cfg = OmegaConf.load(TINY_DB)
    del cfg.model.params["lora"]
    torch.manual_seed(0)
    before = instantiate_from_config(cfg.model)
    torch.manual_seed(0)
    now = instantiate_from_config(OmegaConf.load(TINY_DB).model)
    assert now.lora is None and not lora_layers(now)
    a, b = before.state_dict(), now.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert [p.requires_grad for p in before.parameters()] == [p.requires_grad for p in now.parameters()]


@pytest.mark.parametrize("lora,message", [
    ({"rank": 0}, "DreamBooth: lora.rank must be a positive integer, got 0"),
    ({"rank": 2.5}, "DreamBooth: lora.rank must be a positive integer"),
    ({"alpha": -1}, "DreamBooth: lora.alpha must be a number > 0"),
    ({"dropout": 1.5}, "DreamBooth: lora.dropout must be in"),
    ({"rnak": 4}, "DreamBooth: lora.rnak is not a LoRA setting"),
    ({"text_encoder": False}, "DreamBooth: lora.text_encoder=False but train_text_encoder=True"),
    ({"unet_targets": ["to_z"]}, "LoRA target 'to_z' matches no module"),
])
def test_bad_lora_settings_are_one_line_naming_the_key(lora, message):
    with pytest.raises(ValueError, match=message):
        instantiate_from_config(db_config(**lora).model)


def test_the_end_of_training_export_writes_the_kohya_file_and_the_merged_weights(run, tmp_path):
    trainer = SimpleNamespace(should_stop=False, default_root_dir=str(tmp_path), global_step=3)
    ExportOnTrainEnd().on_train_end(trainer, run.model)
    assert set(load_state_dict(tmp_path / "export" / "lora.safetensors")) == set(load_state_dict(run.kohya))
    exported, merged = load_state_dict(tmp_path / "export" / "model.safetensors"), load_state_dict(run.merged)
    assert set(exported) == set(merged) and all(torch.equal(exported[k], merged[k]) for k in merged)
    assert set(kohya_state_dict(run.model.state_dict(), 5.0)) == set(load_state_dict(run.kohya))
    assert merged_state_dict(run.model.state_dict(), 5.0).keys() == merged.keys()


# ---- the README's commands -----------------------------------------------------------------------
def test_main_py_trains_a_lora_that_exports_and_samples(tmp_path):
    """Train (tiny config, prior preservation, the end-of-training export), export_lora.py, sample.py --lora."""
    from core.lean import full_state_dict
    from tests.main_helpers import DREAMBOOTH_TINY, base_checkpoint, make_images, run_dirs, run_main

    base = base_checkpoint(tmp_path / "base.ckpt")
    proc = run_main(["--base", str(DREAMBOOTH_TINY), "-t", "--actual_resume", str(base), "-n", "lora",
                     "--data_root", str(make_images(tmp_path / "instance", 2)), "--reg_data_root",
                     str(tmp_path / "reg"), "--class_word", "dog", "-l", str(tmp_path / "logs"),
                     "model.params.lora.rank=2", "model.params.train_text_encoder=false",
                     "lightning.trainer.max_steps=2", "dreambooth.num_class_images=2",
                     "lightning.callbacks.export.target=ldm.callbacks.export.ExportOnTrainEnd"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    folder = run_dirs(tmp_path / "logs")[0]
    ckpt = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)
    state, start = ckpt["state_dict"], torch.load(base, weights_only=False)["state_dict"]
    # lean: the frozen base (UNet under the adapters, VAE, text encoder) is left out, by reference
    left_out = set(ckpt["base_weights"]["keys"])
    assert {k for k in start if k.startswith("model.diffusion_model.")} <= left_out and not left_out & set(state)
    assert {k for k in state if k.startswith("model.diffusion_model.")} == {k for k in state if k.endswith((DOWN, UP))}
    full = full_state_dict(folder / "checkpoints" / "last.ckpt")
    assert all(torch.equal(full[k], v) for k, v in start.items())  # the base is frozen
    assert all(state[k].abs().max() > 0 for k in state if k.endswith(UP))  # the adapters trained from up = 0
    config = next((folder / "configs").glob("*-project.yaml"))
    kohya = tmp_path / "lora.safetensors"
    assert export_lora.main([str(folder / "checkpoints" / "last.ckpt"), "--config", str(config),
                             "--kohya", str(kohya), "--dtype", "fp32"]) == 0
    assert load_state_dict(kohya).keys() == load_state_dict(folder / "export" / "lora.safetensors").keys()
    with_lora = _sample(tmp_path, "lora", "--ckpt", base, "--lora", kohya)
    assert np.array_equal(with_lora, _sample(tmp_path, "merged", "--ckpt", folder / "export" / "model.safetensors"))


def test_export_lora_needs_only_the_adapters_in_the_checkpoint(run, tmp_path):
    """A checkpoint that holds the trainable weights only (the adapters) exports the same kohya file."""
    adapters_only = {k: v for k, v in run.model.state_dict().items() if k.endswith((DOWN, UP))}
    save_checkpoint({"state_dict": adapters_only}, tmp_path / "lean.ckpt")
    out = tmp_path / "kohya.safetensors"
    assert export_lora.main([str(tmp_path / "lean.ckpt"), "--config", str(run.folder / "project.yaml"),
                             "--kohya", str(out)]) == 0
    ours, full = load_state_dict(out), load_state_dict(run.kohya)
    assert ours.keys() == full.keys() and all(torch.equal(ours[k], full[k]) for k in full)


def test_export_lora_never_overwrites_the_input_or_an_existing_file(run, tmp_path, capsys):
    ckpt, config = run.folder / "last.ckpt", str(run.folder / "project.yaml")
    before = ckpt.read_bytes()
    kohya = run.kohya.read_bytes()
    cases = [(["--merged", str(ckpt)], "is the input file"),
             (["--kohya", str(run.kohya)], "the file exists (pass --overwrite to replace it)"),
             (["--kohya", str(tmp_path / "a.safetensors"), "--peft", str(tmp_path / "a.safetensors")],
              "two outputs name the same file"),
             (["--peft", str(tmp_path / "no" / "p.safetensors")], "does not exist")]
    for args, message in cases:
        assert export_lora.main([str(ckpt), "--config", config, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert ckpt.read_bytes() == before and run.kohya.read_bytes() == kohya and not list(tmp_path.iterdir())
