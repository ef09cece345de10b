"""scripts/export.py: slim sd-v1 inference files from a Lightning training checkpoint, loaded by our
sample.py, by diffusers' single-file converters and as a diffusers folder."""
import importlib.util
import os
import subprocess
import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from safetensors import safe_open
from torch.utils.data import DataLoader

from core.weights import load_state_dict
from ldm.export import SCHEDULE_KEYS, diffusers_text_encoder, ema_key, save_diffusers
from ldm.loading import load_model
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.txt2img import initial_noise
from core.config import instantiate_from_config
from tests._util import randomize_, rel_err
from tests.sd_fixtures import ROOT, TINY_CONFIG, plain, tiny_config, tiny_model

SCRIPT = ROOT / "scripts" / "export.py"
TINY_DB = ROOT / "configs" / "toy" / "dreambooth-tiny.yaml"
_spec = importlib.util.spec_from_file_location("export_script", SCRIPT)
export_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_script)
PROMPTS = ["a photo of sks dog", "a dog on the beach"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two Lightning steps of the tiny DreamBooth with EMA: (last.ckpt, the trained model)."""
    folder = tmp_path_factory.mktemp("run")
    cfg = OmegaConf.load(TINY_DB)
    cfg.model.params.use_ema = True
    model = instantiate_from_config(cfg.model)
    randomize_(model, seed=4, scale=0.1)
    model.model_ema.reset_from(model.model)
    model.learning_rate = 1e-2
    gen = torch.Generator().manual_seed(0)
    batches = [{"instance": {"image": torch.rand(1, 32, 32, 3, generator=gen) * 2 - 1, "caption": [PROMPTS[0]]}}
               for _ in range(2)]
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[ModelCheckpoint(dirpath=folder, save_last=True)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    return folder / "last.ckpt", model.eval()


def export(*args) -> int:
    return export_script.main([str(a) for a in args])


@pytest.mark.parametrize("ema,dtype,suffix", [("--ema", "fp16", ".safetensors"), ("--no-ema", "fp32", ".ckpt"),
                                              ("--ema", "fp32", ".ckpt"), ("--no-ema", "fp16", ".safetensors")])
def test_export_keeps_the_sd_v1_weights_only(trained, tmp_path, ema, dtype, suffix):
    ckpt, model = trained
    assert {"optimizer_states", "state_dict"} <= set(torch.load(ckpt, weights_only=False))
    out = tmp_path / f"model{suffix}"
    assert export(ckpt, out, ema, "--dtype", dtype) == 0
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # atomic: no temporary file left
    state, expected = load_state_dict(out), model.state_dict()
    assert set(state) == {k for k in expected if not k.startswith("model_ema.")}
    if suffix == ".ckpt":
        assert set(torch.load(out, weights_only=True)) == {"state_dict", "export"}
    else:
        with safe_open(str(out), "pt") as f:
            assert f.metadata()["ema"] == str(ema == "--ema").lower() and f.metadata()["dtype"] == dtype
    want = torch.float16 if dtype == "fp16" else torch.float32
    for k, v in state.items():
        assert v.dtype == (torch.float32 if k in SCHEDULE_KEYS else want), k
        source = expected[ema_key(k)] if ema == "--ema" and k.startswith("model.diffusion_model.") else expected[k]
        torch.testing.assert_close(v, source.to(v.dtype), rtol=0, atol=0)
    unet = [k for k in state if k.startswith("model.diffusion_model.")]
    assert any(not torch.equal(expected[k], expected[ema_key(k)]) for k in unet)  # EMA and raw differ
    loaded = load_model(tiny_config(), out)  # strict
    assert torch.equal(loaded.model.diffusion_model.out[2].weight, state["model.diffusion_model.out.2.weight"].float())


def test_a_released_style_file_exports_without_its_position_ids(trained, tmp_path):
    state = dict(trained[1].state_dict())
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save({"state_dict": state, "global_step": 470000}, tmp_path / "released.ckpt")
    assert export(tmp_path / "released.ckpt", tmp_path / "slim.safetensors", "--dtype", "fp16") == 0
    slim = load_state_dict(tmp_path / "slim.safetensors")
    assert not any(k.endswith("position_ids") or k.startswith("model_ema.") for k in slim)
    with safe_open(str(tmp_path / "slim.safetensors"), "pt") as f:
        assert f.metadata()["global_step"] == "470000" and f.metadata()["ema"] == "true"


def test_the_export_samples_with_sample_py(trained, tmp_path):
    out = tmp_path / "model.safetensors"
    assert export(trained[0], out, "--dtype", "fp16") == 0
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "sample.py"), "--config", str(TINY_CONFIG),
                          "--ckpt", str(out), "--device", "cpu", "--precision", "full", "--H", "32", "--W", "32",
                          "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--outdir", str(tmp_path / "out"),
                          "--prompt", PROMPTS[0]], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert [p.name for p in (tmp_path / "out" / "samples").iterdir()] == ["00000.png"]


def _ours(model, x, t, c):
    with torch.no_grad():
        return model.apply_model(x, t, c), model.decode_first_stage(x), model.get_learned_conditioning(PROMPTS)


def test_diffusers_single_file_converters_load_the_export_strictly(trained, tmp_path):
    out = tmp_path / "model.ckpt"
    assert export(trained[0], out, "--ema") == 0
    state, original = load_state_dict(out), plain(tiny_config())
    model = load_model(tiny_config(), out)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 700])
    c = torch.randn(2, 77, 32)
    eps, image, text = _ours(model, x, t, c)
    unet_cfg = sfu.create_unet_diffusers_config_from_ldm(original, state)
    unet = UNet2DConditionModel(**unet_cfg)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(state, unet_cfg), strict=True)
    vae_cfg = sfu.create_vae_diffusers_config_from_ldm(original, state)
    vae = AutoencoderKL(**vae_cfg)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(state, vae_cfg), strict=True)
    text_encoder = diffusers_text_encoder(state, original)  # convert_ldm_clip_checkpoint, strict
    with torch.no_grad():
        assert rel_err(unet(x, t, encoder_hidden_states=c).sample, eps) < 1e-5
        assert rel_err(vae.decode(x / 0.18215).sample, image) < 1e-5
        ids = model.cond_stage_model.tokenize(PROMPTS)
        assert rel_err(text_encoder(ids).last_hidden_state, text) < 1e-5


def test_diffusers_folder_loads_and_samples_like_our_ddim(trained, tmp_path):
    out, folder = tmp_path / "model.safetensors", tmp_path / "diffusers"
    assert export(trained[0], out, "--no-ema", "--diffusers", folder, "--config", TINY_DB) == 0
    parts = {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    assert parts <= {p.name for p in folder.iterdir()}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    model = load_model(tiny_config(), out)
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, model.cond_stage_model.tokenize(PROMPTS))
    x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        c, uc = model.get_learned_conditioning(PROMPTS[:1]), model.get_learned_conditioning([""])
        ours, _ = DDIMSampler(model).sample(S=2, batch_size=1, shape=(4, 16, 16), conditioning=c,
                                            unconditional_guidance_scale=5.0, unconditional_conditioning=uc,
                                            x_T=x_T, verbose=False)
        theirs = pipe(PROMPTS[0], height=32, width=32, num_inference_steps=2, guidance_scale=5.0, latents=x_T,
                      output_type="latent").images
    assert rel_err(theirs, ours) < 1e-4


def test_bad_inputs_are_one_line_errors(trained, tmp_path, capsys):
    plain_file = tmp_path / "plain.safetensors"
    assert export(trained[0], plain_file, "--no-ema") == 0
    cases = [
        ((tmp_path / "nothere.ckpt", tmp_path / "a.ckpt"), "nothere.ckpt: checkpoint file not found"),
        ((plain_file, tmp_path / "b.ckpt", "--ema"), "EMA weights asked for, but the checkpoint has no model_ema"),
        ((trained[0], tmp_path / "c.bin"), "c.bin: the output must end in .safetensors or .ckpt"),
        ((trained[0], tmp_path / "d.ckpt", "--diffusers", tmp_path), "exists and is not empty"),
    ]
    torch.save({"state_dict": {"model.diffusion_model.w": torch.zeros(1)}}, tmp_path / "unet_only.ckpt")
    cases.append(((tmp_path / "unet_only.ckpt", tmp_path / "e.ckpt"),
                  "not an sd-v1 checkpoint: no first_stage_model.*, cond_stage_model.* keys"))
    torch.save({"state_dict": {**trained[1].state_dict(), "optimizer.step": torch.zeros(1)}}, tmp_path / "odd.ckpt")
    cases.append(((tmp_path / "odd.ckpt", tmp_path / "f.ckpt"),
                  "odd.ckpt: does not fit the sd-v1 layout: unexpected keys 1 (optimizer.step)"))
    for args, message in cases:
        assert export(*args, "--config", TINY_DB) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_export_never_overwrites_its_input_or_an_existing_file(trained, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(trained[0].read_bytes())
    before = ckpt.read_bytes()
    existing = tmp_path / "dog.safetensors"
    existing.write_bytes(b"an earlier export")
    cases = [((ckpt, ckpt), "is the input file"), ((ckpt, tmp_path / "." / "last.ckpt"), "is the input file"),
             ((ckpt, existing), "dog.safetensors: the file exists (pass --overwrite to replace it)"),
             ((ckpt, tmp_path / "missing" / "a.safetensors"), "does not exist"),
             ((ckpt, tmp_path), "is a folder, expected a file name"),
             ((ckpt, ckpt, "--overwrite"), "is the input file")]
    for args, message in cases:
        assert export(*args) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert ckpt.read_bytes() == before and existing.read_bytes() == b"an earlier export"
    assert not (tmp_path / "missing").exists()
    # an unwritable folder (the tests run as root, for whom every folder is writable: os.access says no here)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path / "ro") else real_access(p, mode))
    (tmp_path / "ro").mkdir()
    assert export(ckpt, tmp_path / "ro" / "a.safetensors") == 2
    assert "the folder" in capsys.readouterr().err and not list((tmp_path / "ro").iterdir())
    assert export(ckpt, tmp_path / "x.safetensors", "--diffusers", tmp_path / "ro" / "d", "--config", TINY_DB) == 2
    assert "not a writable folder" in capsys.readouterr().err
    monkeypatch.undo()
    assert export(ckpt, existing, "--overwrite") == 0 and existing.read_bytes() != b"an earlier export"


def test_diffusers_folder_decodes_a_scale_by_std_model_like_ours(tmp_path):
    """vae/config.json carries the checkpoint's measured scale_factor buffer (not the config's 1.0):
    diffusers' pipeline decodes our DDIM's latents into our images."""
    overrides = {"model.params.scale_by_std": True, "model.params.scale_factor": 1.0}
    model = tiny_model(seed=3, **overrides)
    model.scale_factor.fill_(0.2264)
    folder = save_diffusers(model.state_dict(), plain(tiny_config(**overrides)), tmp_path / "diffusers")
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert pipe.vae.config.scaling_factor == pytest.approx(0.2264)
    x_T = initial_noise([7], (4, 16, 16), torch.device("cpu"))
    with torch.no_grad():
        c, uc = model.get_learned_conditioning(PROMPTS[:1]), model.get_learned_conditioning([""])
        z, _ = DDIMSampler(model).sample(S=3, batch_size=1, shape=(4, 16, 16), conditioning=c,
                                         unconditional_guidance_scale=5.0, unconditional_conditioning=uc,
                                         x_T=x_T, verbose=False)
        ours = ((model.decode_first_stage(z) + 1) / 2).clamp(0, 1)  # (1, 3, 32, 32) in [0, 1]
        theirs = pipe(PROMPTS[0], height=32, width=32, num_inference_steps=3, guidance_scale=5.0, latents=x_T,
                      output_type="pt").images
    assert ((ours > 0) & (ours < 1)).float().mean() > 0.5  # mostly unclipped: the comparison sees the scale
    assert rel_err(theirs, ours) < 1e-4
