"""The toy DreamBooth run as whole processes: our ``main.py`` against diffusers' own
``examples/dreambooth/train_dreambooth.py``, on the same work (issue 15's user-level comparison).

The same work on both sides: the shipped toy base model (``models/toy/sd.safetensors``; the script
reads it as a diffusers folder written by ``scripts/export.py``), the four photos of
``data/toy_subject`` as "a sks circle", one folder of class images of "a circle" (sampled once by
our class-image sampler before anything is timed, then read by both), 32 px, centre crop, 4
instance + 4 class images a step, prior_loss_weight 1, the text encoder trained, lr 1e-5 constant,
``--steps`` steps, fp32, seed 23. Neither side samples validation images or saves intermediate
checkpoints; ours writes its resumable ``last.ckpt`` and its export at the end, the script its
pipeline folder. The sides take turns (``benchmarks.common``'s order); each figure is the median
of ``--repeats`` runs.

Per side: s / step (the training loop alone: its progress bar's elapsed time over its steps),
the whole process's wall time (start-up, loading, training, saving), its peak RSS (``wait4``'s
``ru_maxrss``), and ours / script. Ours runs as shipped (``configs/toy/dreambooth.yaml``: its
latent cache and ``adamw_fused``), with the script's optimizer (``adamw``), and with neither.
Each run must show ``--steps`` steps done, a finite last loss and its saved model, else an error.

    python -m benchmarks.toy_run --script diffusers/examples/dreambooth/train_dreambooth.py \\
        --pythonpath DIR_WITH_TORCHVISION

The script needs torchvision (its data transforms), which this project does not install: put it on
``--pythonpath``. The figures in the README were taken this way.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from benchmarks.common import markdown_table
from core.cli import ArgumentParser

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "models/toy/sd.safetensors"
PHOTOS = ROOT / "data/toy_subject"
CONFIG = ROOT / "configs/toy/dreambooth.yaml"
INSTANCE, CLASS, CLASS_WORD = "a sks circle", "a circle", "circle"
SEED, LR, BATCH, RESOLUTION = 23, 1e-5, 4, 32
OURS = {  # variant -> extra config overrides of main.py
    "ours, as shipped (latent cache, adamw_fused)": [],
    "ours, adamw (the script's optimizer)": ["model.params.optimizer=adamw"],
    "ours, adamw, no latent cache": ["model.params.optimizer=adamw", "model.params.cache_latents=false"],
}
SCRIPT = "diffusers train_dreambooth.py"
# a tqdm bar's state: "<prefix>: 100%|####| 300/300 [01:02<00:00,  4.81it/s, ..., <loss key>=0.162, ...]"
BAR = r"{prefix}: *\d+%\|[^|]*\| *(\d+)/(\d+) \[([\d:]+)<[^,\]]*,[^\]]*?{loss}=([-+\w.]+)"


@dataclass
class Run:
    """One process: its step count, training-loop seconds, last loss, wall seconds and peak RSS (bytes)."""

    steps: int
    loop_s: float
    loss: float
    wall_s: float
    rss: int


@dataclass
class Side:
    runs: list[Run] = field(default_factory=list)

    def median(self, what: str) -> float:
        return statistics.median(getattr(r, what) for r in self.runs)


def clock_seconds(text: str) -> int:
    """tqdm's elapsed time, ``[h:]mm:ss``, in seconds."""
    seconds = 0
    for part in text.split(":"):
        seconds = seconds * 60 + int(part)
    return seconds


def last_bar(log: str, prefix: str, loss_key: str) -> tuple[int, float, float] | None:
    """(steps done, elapsed seconds, last loss) of the last state of the ``prefix`` progress bar in ``log``."""
    found = re.findall(BAR.format(prefix=re.escape(prefix), loss=re.escape(loss_key)), log)
    if not found:
        return None
    done, _total, elapsed, loss = found[-1]
    try:
        value = float(loss)
    except ValueError:
        value = math.nan
    return int(done), float(clock_seconds(elapsed)), value


def run_process(argv: Sequence[str], env: dict[str, str], log_path: Path) -> tuple[str, float, int]:
    """Run ``argv`` with its output in ``log_path``: (its output, wall seconds, peak RSS in bytes)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[1]} failed (exit {proc.returncode}); its log {log_path}:\n{text[-2000:]}")
    return text, wall, usage.ru_maxrss * 1024  # ru_maxrss: KiB on Linux


def checked_run(text: str, wall: float, rss: int, prefix: str, loss_key: str, steps: int, saved: Path,
                what: str) -> Run:
    """The figures of one finished process, after checking it did the work asked."""
    bar = last_bar(text, prefix, loss_key)
    if bar is None or bar[0] != steps:
        raise RuntimeError(f"{what}: expected {steps} steps in its progress bar, found {bar and bar[0]}")
    if not math.isfinite(bar[2]):
        raise RuntimeError(f"{what}: its last loss is {bar[2]}")
    if not saved.is_file():
        raise RuntimeError(f"{what}: its saved model {saved} is missing")
    return Run(steps=steps, loop_s=bar[1], loss=bar[2], wall_s=wall, rss=rss)


def ours_argv(class_dir: Path, logdir: Path, name: str, steps: int, extra: Sequence[str]) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), "--base", str(CONFIG), "-t", "--actual_resume", str(BASE),
            "--data_root", str(PHOTOS), "--reg_data_root", str(class_dir), "--class_word", CLASS_WORD,
            "-n", name, "-l", str(logdir), f"lightning.trainer.max_steps={steps}",
            "lightning.callbacks.image_logger=null", f"lightning.checkpoint.every_n_steps={steps + 1}",
            f"lightning.seed={SEED}", *extra]


def script_argv(script: Path, folder: Path, class_dir: Path, out: Path, steps: int, num_class: int) -> list[str]:
    return [sys.executable, str(script), "--pretrained_model_name_or_path", str(folder),
            "--instance_data_dir", str(PHOTOS), "--class_data_dir", str(class_dir),
            "--instance_prompt", INSTANCE, "--class_prompt", CLASS, "--with_prior_preservation",
            "--prior_loss_weight", "1.0", "--num_class_images", str(num_class), "--output_dir", str(out),
            "--resolution", str(RESOLUTION), "--center_crop", "--train_batch_size", str(BATCH),
            "--learning_rate", str(LR), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--max_train_steps", str(steps), "--train_text_encoder", "--checkpointing_steps", str(steps + 1),
            "--seed", str(SEED), "--dataloader_num_workers", "0", "--mixed_precision", "no"]


class Bench:
    """The prepared work (diffusers folder, class images) and the timed runs of each side."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        self.env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
        if args.pythonpath:
            self.env["PYTHONPATH"] = os.pathsep.join([args.pythonpath, self.env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.class_dir, self.folder = work / "class_images", work / "toy_diffusers"
        self.count = 0

    def prepare(self) -> None:
        """The diffusers folder of the base model (``scripts/export.py``) and the class images (our
        sampler, in a 1-step main.py run), made in this process: nothing here is timed."""
        from core import trainer
        from scripts import export

        export.run(export.parse_args([str(BASE), str(self.work / "base.safetensors"), "--dtype", "fp32",
                                      "--diffusers", str(self.folder), "--config", str(ROOT / "configs/toy/sd.yaml")]))
        argv = ours_argv(self.class_dir, self.work / "prepare", "prepare", 1,
                         [f"dreambooth.num_class_images={self.args.num_class_images}"])
        if trainer.main(argv[2:]) != 0:
            raise RuntimeError("the run sampling the class images failed")
        found = len(list(self.class_dir.glob("*.png")))
        if found != self.args.num_class_images:
            raise RuntimeError(f"{self.class_dir}: expected {self.args.num_class_images} class images, found {found}")

    def ours(self, variant: str) -> Run:
        self.count += 1
        logdir, name = self.work / f"ours_{self.count}", f"run{self.count}"
        extra = [*OURS[variant], f"dreambooth.num_class_images={self.args.num_class_images}"]
        text, wall, rss = run_process(ours_argv(self.class_dir, logdir, name, self.args.steps, extra), self.env,
                                      self.work / f"ours_{self.count}.log")
        (run_dir,) = logdir.glob(f"*_{name}")
        return checked_run(text, wall, rss, "train", "train/loss", self.args.steps,
                           run_dir / "export" / "model.safetensors", variant)

    def script(self) -> Run:
        self.count += 1
        out = self.work / f"script_{self.count}"
        argv = script_argv(Path(self.args.script), self.folder, self.class_dir, out, self.args.steps,
                           self.args.num_class_images)
        text, wall, rss = run_process(argv, self.env, self.work / f"script_{self.count}.log")
        return checked_run(text, wall, rss, "Steps", "loss", self.args.steps,
                           out / "unet" / "diffusion_pytorch_model.safetensors", SCRIPT)


def table(sides: dict[str, Side], steps: int) -> str:
    ref = sides[SCRIPT]
    rows = []
    for name, side in sides.items():
        ratio = {w: side.median(w) / ref.median(w) for w in ("loop_s", "wall_s", "rss")}
        rows.append([name, f"{side.median('loop_s') / steps:.3f} ({ratio['loop_s']:.2f})",
                     f"{side.median('wall_s'):.1f} ({ratio['wall_s']:.2f})",
                     f"{side.median('rss') / 2**20:.0f} ({ratio['rss']:.2f})", f"{side.median('loss'):.4f}",
                     ", ".join(f"{r.loop_s:.0f} / {r.wall_s:.1f}" for r in side.runs)])
    return markdown_table(["side", "s / step (ours / script)", "process wall s (ours / script)",
                           "peak RSS MiB (ours / script)", "last loss", "each run: loop s / wall s"], rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--script", required=True, help="diffusers' examples/dreambooth/train_dreambooth.py")
    p.add_argument("--pythonpath", default=None, help="a folder to put on the script's PYTHONPATH (torchvision)")
    p.add_argument("--steps", type=int, default=300, help="training steps of every run (the toy config's 300)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each side, taking turns")
    p.add_argument("--num_class_images", type=int, default=64, help="class images (the toy config's 64)")
    p.add_argument("--variants", nargs="+", choices=list(OURS), default=list(OURS), help="our runs to time")
    p.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = p.parse_args(argv)
    if not Path(args.script).is_file():
        p.error(f"--script {args.script}: no such file (diffusers' examples/dreambooth/train_dreambooth.py)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="toy_run_") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        bench = Bench(args, work)
        bench.prepare()
        names = [*args.variants, SCRIPT]
        sides = {name: Side() for name in names}
        for r in range(args.repeats):
            for name in names if r % 2 == 0 else reversed(names):
                sides[name].runs.append(bench.script() if name == SCRIPT else bench.ours(name))
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
        text = (f"Toy DreamBooth, {args.steps} steps of {BATCH} + {BATCH} images, {args.repeats} runs a side "
                f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; load average after: {load})\n\n"
                + table(sides, args.steps))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
