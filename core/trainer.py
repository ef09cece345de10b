"""The trainer behind ``main.py``: every training job (DreamBooth, latent diffusion, the autoencoder,
BLIP-2) from OmegaConf configs, with the CompVis command line.

    python main.py --base configs/dreambooth.yaml -t --actual_resume sd-v1-4.ckpt \\
        --data_root data/dog --reg_data_root data/dog_class --class_word dog -n dog
    python main.py -r logs/<time>_dog -t          # resume: saved configs, checkpoints/last.ckpt

Steps: 1. merge the ``--base`` configs (a resumed run's saved configs first), the command-line
settings and trailing ``key=value`` overrides; 2. check the inputs (one clear line on error; a data module may add its own ``check_config``);
3. make ``logs/<time>_<name>/{checkpoints,configs,images}`` and save the merged config;
4. build model, data, callbacks and Trainer from the config; 5. fit, resuming when asked.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import inspect
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from core.callbacks.checkpointing import AtomicCheckpointIO, RankSeed, ResumableCheckpoint
from core.callbacks.finite import StopOnNonFinite
from core.callbacks.progress import StepProgressBar, quiet_libraries
from core.cli import ArgumentParser, Stopped, run_cli
from core.config import check_params, get_obj_from_str, instantiate_from_config, load_config
from core.signals import StopBetweenSteps
from core.weights import CheckpointError, atomic_path

RUN_LOGDIR_ENV = "LDM_RUN_LOGDIR"  # rank 0 hands the log dir to the processes DDP launches
DEFAULT_SEED = 23
DEFAULT_TOKEN = "sks"
SET_BY_MAIN = {"logger", "callbacks", "plugins", "default_root_dir", "use_distributed_sampler"}


def str2bool(v: str) -> bool:
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")


def get_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-b", "--base", nargs="*", default=[], metavar="base_config.yaml",
                   help="configs merged left to right (later ones override)")
    p.add_argument("-t", "--train", action="store_true", help="train")
    p.add_argument("-n", "--name", default="", help="run name: logs/<time>_<name>")
    p.add_argument("-r", "--resume", default="", help="resume from a log dir or a checkpoint inside one")
    p.add_argument("--actual_resume", default="", help="the base sd-v1 checkpoint to fine-tune")
    p.add_argument("--data_root", default=None, help="folder of instance images (dreambooth.data_root)")
    p.add_argument("--reg_data_root", default=None, help="folder of class images (dreambooth.class_data_root)")
    p.add_argument("--class_word", default=None, help="class noun, e.g. dog (dreambooth.class_word)")
    p.add_argument("--token", default=None, help=f"identifier of the subject (dreambooth.identifier, default "
                                                  f"{DEFAULT_TOKEN})")
    p.add_argument("-s", "--seed", type=int, default=None, help=f"seed (default {DEFAULT_SEED})")
    p.add_argument("-l", "--logdir", default="logs", help="folder of the run folders")
    p.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=None,
                   help="lr = base_lr * accumulate_grad_batches * devices * num_nodes * batch_size "
                        "(default: the config's lightning.scale_lr, else true as in CompVis)")
    p.add_argument("--no-test", dest="no_test", action="store_true",
                   help="skip the final evaluation on the validation set")
    return p


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Options and the trailing ``key=value`` overrides."""
    opt, rest = get_parser().parse_known_args(list(argv))
    overrides = [b for b in opt.base if "=" in b and not Path(b).is_file()]  # --base a.yaml k=v: k=v
    opt.base = [b for b in opt.base if b not in overrides]
    rest = overrides + rest
    bad = [a for a in rest if "=" not in a or a.startswith("-")]
    if bad:
        raise ValueError(f"unrecognized argument {bad[0]!r} (options are listed by --help; "
                         "config overrides are key=value)")
    if opt.name and opt.resume:
        raise ValueError("-n/--name and -r/--resume cannot be combined (a resumed run keeps its log dir)")
    return opt, rest


# ---- configs ---------------------------------------------------------------------------------
def find_resume(path: str) -> tuple[Path, Path]:
    """``-r`` (a log dir, or a checkpoint in ``<logdir>/checkpoints/``) -> (log dir, checkpoint)."""
    p = Path(path)
    if p.is_file():
        logdir, ckpt = p.parent.parent, p
    elif p.is_dir():
        logdir, ckpt = p, p / "checkpoints" / "last.ckpt"
    else:
        raise ValueError(f"--resume {path}: no such log dir or checkpoint")
    if not ckpt.is_file():
        raise ValueError(f"--resume {path}: no checkpoints/last.ckpt (expected a log dir made by main.py)")
    if not sorted((logdir / "configs").glob("*.yaml")):
        raise ValueError(f"--resume {path}: no configs/*.yaml in {logdir} (expected a log dir made by main.py)")
    return logdir, ckpt


def cli_settings(opt: argparse.Namespace) -> DictConfig:
    """The options that set config values (only those given on the command line)."""
    given = {"identifier": opt.token, "class_word": opt.class_word, "data_root": opt.data_root,
             "class_data_root": opt.reg_data_root}
    settings: dict[str, Any] = {}
    if any(v is not None for v in given.values()):
        settings["dreambooth"] = {k: v for k, v in given.items() if v is not None}
    if opt.seed is not None:
        settings["lightning"] = {"seed": opt.seed}
    if opt.actual_resume and not opt.resume:  # with -r it relocates the base file instead (relocate_base)
        settings["model"] = {"params": {"ckpt_path": opt.actual_resume}}
    return OmegaConf.create(settings)


def run_config(opt: argparse.Namespace, overrides: list[str], resume_logdir: Path | None) -> DictConfig:
    """Saved configs of a resumed run, ``--base`` files, command-line settings, overrides: merged."""
    files = [str(p) for p in sorted((resume_logdir / "configs").glob("*.yaml"))] if resume_logdir else []
    files += opt.base
    if not files:
        raise ValueError("no config: pass --base config.yaml (or -r a log dir)")
    for f in files:
        if not Path(f).is_file():
            raise ValueError(f"--base {f}: config file not found")
    config = load_config(files)
    if "model" not in config:
        raise ValueError(f"{', '.join(files)}: the config has no 'model' section (expected model.target and "
                         "model.params)")
    config = OmegaConf.merge(config, cli_settings(opt), OmegaConf.from_dotlist(overrides))
    if OmegaConf.select(config, "lightning.seed") is None:
        OmegaConf.update(config, "lightning.seed", DEFAULT_SEED)
    if "dreambooth" in config and config.dreambooth.get("identifier") is None:
        config.dreambooth.identifier = DEFAULT_TOKEN
    if resume_logdir is not None and OmegaConf.select(config, "model.params.ckpt_path") is not None:
        OmegaConf.update(config, "model.params.ckpt_path", None)  # every weight comes from the resumed checkpoint
    return config


def check_inputs(config: DictConfig, train: bool, resuming: bool) -> None:
    """Fail early, in one line, on the inputs users get wrong."""
    ckpt = OmegaConf.select(config, "model.params.ckpt_path")
    if ckpt and not Path(ckpt).is_file():
        raise CheckpointError(f"--actual_resume {ckpt}: checkpoint file not found")
    trainer_kwargs(config)
    lr = OmegaConf.select(config, "model.base_learning_rate")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
        raise ValueError(f"model.base_learning_rate={lr!r}: expected a number > 0")
    if not train:
        return
    if "dreambooth" in config and not ckpt and not resuming:
        raise ValueError("--actual_resume is required: DreamBooth fine-tunes a base sd-v1 checkpoint")
    if "data" not in config:
        raise ValueError("the config has no 'data' section: nothing to train on")
    check = getattr(get_obj_from_str(config.data.target), "check_config", None) if "target" in config.data else None
    if check is not None:
        check(config)


# ---- log dir -----------------------------------------------------------------------------------
def is_rank_zero() -> bool:
    return getattr(rank_zero_only, "rank", 0) == 0


def new_run_folder(parent: Path, name: str) -> Path:
    """``parent/name``, or ``name_1``, ``name_2`` ...: the first that this process creates itself (one
    ``mkdir`` each, so two runs started in the same second never share a folder)."""
    parent.mkdir(parents=True, exist_ok=True)
    for suffix in itertools.count():
        folder = parent / (f"{name}_{suffix}" if suffix else name)
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def make_logdir(opt: argparse.Namespace, resume_logdir: Path | None, now: str) -> Path:
    """``<logdir>/<now>_<name>``, or the resumed run's; DDP's extra processes reuse rank 0's."""
    if not is_rank_zero() and os.environ.get(RUN_LOGDIR_ENV):
        return Path(os.environ[RUN_LOGDIR_ENV])
    if resume_logdir is not None:
        logdir = resume_logdir
    else:
        name = opt.name or (Path(opt.base[-1]).stem if opt.base else "run")
        logdir = new_run_folder(Path(opt.logdir), f"{now}_{name}")
    for sub in ("checkpoints", "configs", "images"):
        (logdir / sub).mkdir(parents=True, exist_ok=True)
    os.environ[RUN_LOGDIR_ENV] = str(logdir)
    return logdir


def save_config(config: DictConfig, logdir: Path, now: str) -> Path:
    """The merged config, interpolations kept (so overrides of ``dreambooth.*`` keep working)."""
    path = logdir / "configs" / f"{now}-project.yaml"
    with atomic_path(path) as tmp:
        OmegaConf.save(config, tmp)
    return path


def forget_failed_start(logdir: Path, new_run: bool, config_file: Path | None) -> None:
    """A run that failed before writing any checkpoint leaves nothing a later run would trust: a new
    run's folder is removed, a failed resume takes back the config it added."""
    if config_file is None or not config_file.exists():
        return
    since = config_file.stat().st_mtime
    if any(p.stat().st_mtime >= since for p in (logdir / "checkpoints").glob("*.ckpt")):
        return  # progress was saved: keep everything
    if new_run:
        shutil.rmtree(logdir, ignore_errors=True)
    else:
        config_file.unlink(missing_ok=True)


# ---- Lightning objects -----------------------------------------------------------------------------
def build_callbacks(config: DictConfig, logdir: Path) -> list[pl.Callback]:
    """``lightning.callbacks`` (name -> {target, params}; null drops one) and the run's own."""
    callbacks = []
    for cfg in (OmegaConf.select(config, "lightning.callbacks") or {}).values():
        if cfg is None:
            continue
        callback = instantiate_from_config(cfg)
        if getattr(callback, "logdir", "") is None:
            callback.logdir = str(logdir)
        callbacks.append(callback)
    checkpoint = OmegaConf.to_container(OmegaConf.select(config, "lightning.checkpoint") or {})
    callbacks += [ResumableCheckpoint(logdir / "checkpoints", **checkpoint), RankSeed(config.lightning.seed),
                  StopOnNonFinite(), LearningRateMonitor(logging_interval="step")]
    if OmegaConf.select(config, "lightning.trainer.enable_progress_bar", default=True) and \
            not any(isinstance(c, pl.callbacks.ProgressBar) for c in callbacks):
        callbacks.append(StepProgressBar())
    return callbacks


def trainer_kwargs(config: DictConfig) -> dict[str, Any]:
    """``lightning.trainer`` with every key checked against ``Trainer``'s arguments."""
    section = OmegaConf.select(config, "lightning.trainer")
    if section is not None and not isinstance(section, DictConfig):
        raise ValueError(f"lightning.trainer: expected a mapping of Trainer arguments, got {section!r}")
    kwargs = OmegaConf.to_container(section, resolve=True) if section is not None else {}
    allowed = set(inspect.signature(pl.Trainer.__init__).parameters) - SET_BY_MAIN - {"self"}
    for key in kwargs:
        if key in SET_BY_MAIN:
            raise ValueError(f"lightning.trainer.{key}: set by main.py, not by the config")
        if key not in allowed:
            raise ValueError(f"lightning.trainer.{key}: not an argument of lightning's Trainer")
    check_params("lightning.trainer", pl.Trainer, kwargs)
    for key in ("max_steps", "max_epochs"):
        value = kwargs.get(key)
        if isinstance(value, int) and (value == 0 or value < -1):
            raise ValueError(f"lightning.trainer.{key}={kwargs[key]}: expected a positive number (or -1: no limit)")
    return kwargs


def build_trainer(config: DictConfig, logdir: Path) -> pl.Trainer:
    """Lightning's module table is off unless the config asks for it: ``report_parameters`` says the
    one figure a user needs from it."""
    logger = TensorBoardLogger(save_dir=str(logdir), name="tensorboard", version="", default_hp_metric=False)
    kwargs = {"enable_model_summary": False, **trainer_kwargs(config)}
    return pl.Trainer(**kwargs, default_root_dir=str(logdir), logger=logger,
                      callbacks=build_callbacks(config, logdir), plugins=[AtomicCheckpointIO()],
                      use_distributed_sampler=False)


def set_learning_rate(model: pl.LightningModule, config: DictConfig, trainer: pl.Trainer, scale_lr: bool) -> None:
    """CompVis: lr = base_lr, times accumulate_grad_batches * devices * num_nodes * batch_size."""
    base_lr = float(config.model.base_learning_rate)
    batch_size = int(OmegaConf.select(config, "data.params.batch_size") or 1)
    factor = trainer.accumulate_grad_batches * trainer.num_devices * trainer.num_nodes * batch_size
    model.learning_rate = base_lr * factor if scale_lr else base_lr
    rank_zero_info(f"learning rate {model.learning_rate:.2e}" + (
        f" = {trainer.accumulate_grad_batches} (accumulate_grad_batches) * {trainer.num_devices} (devices) * "
        f"{trainer.num_nodes} (nodes) * {batch_size} (batch size) * {base_lr:.2e} (base_learning_rate)"
        if scale_lr else " (base_learning_rate, not scaled)"))


def relocate_base(model: Any, path: str) -> None:
    """``--actual_resume`` with ``--resume``: the base file of the run's lean checkpoints, moved to ``path``
    (a model with a base file defines ``set_base_weights``; the file's content is checked on load)."""
    if not Path(path).is_file():
        raise CheckpointError(f"--actual_resume {path}: checkpoint file not found")
    set_base = getattr(model, "set_base_weights", None)
    if set_base is None:
        raise ValueError(f"--actual_resume {path} with --resume: {type(model).__name__} is not trained from a base "
                         "file (its checkpoints are complete)")
    set_base(path)


def run(opt: argparse.Namespace, overrides: list[str]) -> int:
    where: dict[str, Path] = {}

    def stopped_outside_steps(signal_name: str) -> str:
        last = where["logdir"] / "checkpoints" / "last.ckpt" if "logdir" in where else None
        if last is not None and last.is_file():
            return (f"{signal_name} received outside the training steps: {last} is complete; "
                    f"continue with main.py -r {where['logdir']} -t")
        return f"{signal_name} received before training started: nothing was saved"

    with StopBetweenSteps(Stopped, stopped_outside_steps):
        return _run(opt, overrides, where)


def _run(opt: argparse.Namespace, overrides: list[str], where: dict[str, Path]) -> int:
    resume_logdir, resume_ckpt = find_resume(opt.resume) if opt.resume else (None, None)
    config = run_config(opt, overrides, resume_logdir)
    check_inputs(config, opt.train, resuming=resume_logdir is not None)
    pl.seed_everything(config.lightning.seed, verbose=False)
    model = instantiate_from_config(config.model)  # a bad base checkpoint fails here, before the log dir exists
    if resume_logdir is not None and opt.actual_resume:
        relocate_base(model, opt.actual_resume)
    data = instantiate_from_config(config.data) if "data" in config else None

    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    where["logdir"] = logdir = make_logdir(opt, resume_logdir, now)
    config_file = save_config(config, logdir, now) if is_rank_zero() else None
    try:
        return train(opt, config, model, data, logdir, resume_ckpt)
    except BaseException:
        forget_failed_start(logdir, resume_logdir is None, config_file)
        raise


def train(opt: argparse.Namespace, config: DictConfig, model: Any, data: Any, logdir: Path,
          resume_ckpt: Path | None) -> int:
    """Build the Trainer in ``logdir``; fit and/or validate."""
    trainer = build_trainer(config, logdir)
    scale_lr = opt.scale_lr if opt.scale_lr is not None else OmegaConf.select(config, "lightning.scale_lr",
                                                                            default=True)
    set_learning_rate(model, config, trainer, bool(scale_lr))
    if opt.train:
        report_parameters(model)
        trainer.fit(model, datamodule=data, ckpt_path=str(resume_ckpt) if resume_ckpt else None, weights_only=True)
    if not opt.no_test and OmegaConf.select(config, "data.params.validation") and not trainer.interrupted:
        # without -t, -r validates the resumed weights (with -t, fit has loaded them already)
        trainer.validate(model, datamodule=data, ckpt_path=str(resume_ckpt) if resume_ckpt and not opt.train else None,
                         weights_only=True)
    report_outputs(logdir)
    return 0


def count(n: int) -> str:
    return next(f"{n / d:.{p}f} {u}".rstrip() for d, u, p in ((1e9, "B", 2), (1e6, "M", 1), (1e3, "k", 1), (1, "", 0))
                if n >= d or d == 1)


def report_parameters(model: Any) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    rank_zero_info(f"parameters: {count(trainable)} trained of {count(total)}")


def report_outputs(logdir: Path) -> None:
    """One line: the run folder and what it holds (the newest checkpoint, export, image grid)."""
    if not is_rank_zero():
        return
    parts = []
    for sub, pattern in (("checkpoints", "last.ckpt"), ("export", "*"), ("images", "step-*/grid.png")):
        found = sorted((logdir / sub).glob(pattern)) if (logdir / sub).is_dir() else []
        if found:  # step folders sort by their zero-padded numbers
            parts.append(str(found[-1].relative_to(logdir)))
    if (logdir / "tensorboard").is_dir():
        parts.append("tensorboard/")
    rank_zero_info(f"outputs: {logdir}/ ({', '.join(parts) or 'nothing saved'})")


def main(argv: Sequence[str] | None = None) -> int:
    """Run; a bad input is one line on stderr and exit status 2."""
    quiet_libraries()
    return run_cli("main.py", lambda args: run(*parse_args(args)), argv,
                   errors=(ValueError, FileNotFoundError, OmegaConfBaseException, MisconfigurationException))
