"""Reliability in figures: runs killed, stopped and starved of disk at random moments, then resumed,
compared with uninterrupted runs of the same tiny models (CPU, one thread: bit-exact). Prints a
markdown table and exits 1 when any trial fails.

    python -m benchmarks.reliability                      # the full set (20 SIGKILL trials ...)
    python -m benchmarks.reliability --quick --only eval,logdirs
    python -m benchmarks.reliability --trials 5 --out results.md

Checks (``--only`` names):

- ``sigkill``: DreamBooth (EMA, random crops, LR warm-up, a checkpoint every step) SIGKILLed from
  outside after a random delay (some runs twice), resumed with ``main.py -r``: every logged scalar
  (losses, learning rate) and the final checkpoint (weights with EMA, optimizer, LR schedule) equal
  the uninterrupted run's, bit for bit; no temporary file is left.
- ``save``: the same, killed at a random moment inside a checkpoint write: ``last.ckpt`` is readable,
  the resume is exact, the dead writer's temporary is gone after it.
- ``signals``: SIGTERM and SIGINT (Ctrl-C) mid-training: a clean exit that saved ``last.ckpt``,
  then an exact resume.
- ``disk``: a checkpoint write that hits a file size limit (``RLIMIT_FSIZE``, as a full disk): exit
  status 1 and one line naming the file and the reason, no traceback, ``last.ckpt`` unchanged, no
  temporary left; the resume without the limit is exact.
- ``classimg``: class-image generation SIGKILLed or SIGTERMed (one line, exit 1) and rerun: the
  same files, byte for byte, as an uninterrupted generation; nothing else in the folder.
- ``blip2``: BLIP-2 caption fine-tuning through ``main.py``, SIGKILLed and resumed: exact.
- ``eval``: ``scripts/evaluate_blip2.py`` SIGKILLed and rerun: ``results.json`` and
  ``metrics.json`` byte-equal to an uninterrupted run's, each item once in the partial file.
- ``logdirs``: two ``main.py`` runs of the same name started together get separate run folders;
  and processes racing ``core.trainer.new_run_folder`` in the same instant never share one.

``--tamper`` changes the references slightly (one loss by one ulp, one image byte, one caption):
every compared check must then fail, which shows that the comparisons can fail. The tiny models come
from the test fixtures (``tests/``), so run it from a source checkout.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from core.weights import CheckpointError, load_checkpoint
from tests.main_helpers import DREAMBOOTH_TINY, _env, base_checkpoint, make_images, read_all_scalars
from tests.sd_fixtures import ROOT

STEPS = 8
DREAMBOOTH = [f"lightning.trainer.max_steps={STEPS}", "lightning.checkpoint.every_n_steps=1",
              "lightning.checkpoint.keep_last=2", "model.params.use_ema=true",
              "data.params.train.params.crop=random", "data.params.train.params.repeats=1",
              "dreambooth.num_class_images=6", "lightning.callbacks.class_images.params.ddim_steps=6",
              "model.params.scheduler_config.target=ldm.lr_scheduler.LambdaLinearScheduler",
              "model.params.scheduler_config.params.warm_up_steps=[5]",
              "model.params.scheduler_config.params.f_start=[0.1]", "model.params.scheduler_config.params.f_max=[1.0]",
              "model.params.scheduler_config.params.f_min=[0.5]",
              "model.params.scheduler_config.params.cycle_lengths=[100]"]
BLIP2_STEPS = 6
TIMEOUT = 600


# ---- processes -------------------------------------------------------------------------------------
@dataclass
class Done:
    """A finished child: exit status, its stderr text, and when (seconds after start) each watched
    condition first held."""

    code: int
    stderr: str
    seen: dict[str, float] = field(default_factory=dict)


def spawn(script: Path, args: Sequence[str], log: Path, file_size: int | None = None) -> subprocess.Popen:
    """``python script *args`` with output to ``log`` (.out / .err); ``file_size``: RLIMIT_FSIZE in bytes
    (SIGXFSZ ignored, so an over-long write is the OSError EFBIG)."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=log.parent, env=_env(),
                                stdout=out, stderr=err, preexec_fn=limit if file_size else None)


def watch(proc: subprocess.Popen, log: Path, conditions: Mapping[str, Callable[[], bool]] | None = None,
          until: str | None = None, signum: int | None = None, delay: float = 0.0) -> Done:
    """Poll ``conditions`` every 2 ms, noting when each first holds; ``delay`` s after ``until`` holds, send
    ``signum`` (once: ``signal_sent`` is noted, and ``inside``, whether ``until`` still held just before).
    Returns when the child ends (``exit`` is noted)."""
    conditions, start, seen, sent_at = dict(conditions or {}), time.monotonic(), {}, None
    while proc.poll() is None:
        now = time.monotonic() - start
        for name, holds in conditions.items():
            if name not in seen and holds():
                seen[name] = now
        if signum is not None and until in seen and sent_at is None and now >= seen[until] + delay:
            seen["inside"] = float(conditions[until]())
            os.kill(proc.pid, signum)
            sent_at = seen["signal_sent"] = now
        if now > TIMEOUT:
            proc.kill()
        time.sleep(0.002)
    seen["exit"] = time.monotonic() - start
    return Done(proc.wait(), log.with_suffix(".err").read_text(errors="replace"), seen)


def main_py(args: Sequence[str], log: Path, **kw: Any) -> Done:
    return watch(spawn(ROOT / "main.py", args, log), log, **kw)


def events(logdir: Path) -> Callable[[], int]:
    return lambda: len(list(logdir.glob("*/tensorboard/events.out.tfevents.*")))


def more_than(count: Callable[[], int]) -> Callable[[], bool]:
    before = count()
    return lambda: count() > before


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp")) if folder.is_dir() else []


def resumable_run(logdir: Path) -> Path | None:
    """The run folder under ``logdir`` that ``-r`` can continue (the newest with a last.ckpt)."""
    runs = [p for p in sorted(logdir.glob("*")) if (p / "checkpoints" / "last.ckpt").is_file()
            and list((p / "configs").glob("*.yaml"))]
    return runs[-1] if runs else None


def last_step(run: Path | None) -> int | None:
    if run is None:
        return None
    try:
        return int(load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"])
    except CheckpointError:
        return -1  # unreadable


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- comparisons (pure: the tests feed them corrupted copies) --------------------------------------------
def scalar_differences(ref: Mapping[str, Mapping[int, float]], run: Mapping[str, Mapping[int, float]]) -> list[str]:
    """'tag: step s a != b' for every tag / step where the runs' logged scalars differ (exactly)."""
    problems = []
    for tag in sorted(set(ref) | set(run)):
        a, b = ref.get(tag, {}), run.get(tag, {})
        if a.keys() != b.keys():
            problems.append(f"{tag}: steps {sorted(a)} vs {sorted(b)}")
            continue
        problems += [f"{tag}: step {s} {a[s]!r} != {b[s]!r}" for s in sorted(a) if a[s] != b[s]][:1]
    return problems


def _tensor_differences(a: Any, b: Any, where: str) -> list[str]:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [f"{where}: tensors differ"]
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(map(str, set(a) ^ set(b)))[:3]} in one only"]
        return [p for k in a for p in _tensor_differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} vs {len(b)}"]
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in _tensor_differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def state_differences(ref: Mapping[str, Any], run: Mapping[str, Any]) -> list[str]:
    """What differs between two training checkpoints: step, weights (EMA included), optimizer, LR schedule."""
    return [p for key in ("global_step", "state_dict", "optimizer_states", "lr_schedulers")
            for p in _tensor_differences(ref.get(key), run.get(key), key)][:3]


def file_differences(ref: Mapping[str, bytes], folder: Path) -> list[str]:
    """Files of ``folder`` (hidden ones included) that are missing, extra or not byte-equal to ``ref``."""
    found = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}
    problems = [f"missing {n}" for n in sorted(set(ref) - set(found))]
    problems += [f"unexpected {n}" for n in sorted(set(found) - set(ref))]
    return problems + [f"{n} differs" for n in sorted(set(ref) & set(found)) if ref[n] != found[n]]


def tamper_scalars(scalars: dict[str, dict[int, float]]) -> None:
    """One value of one tag moved by one ulp (float32, as TensorBoard stores them)."""
    tag = sorted(scalars)[0]
    step = min(scalars[tag])
    scalars[tag][step] = float(np.nextafter(np.float32(scalars[tag][step]), np.float32(np.inf)))


def tamper_bytes(files: dict[str, bytes]) -> None:
    name = sorted(files)[0]
    data = bytearray(files[name])
    data[len(data) // 2] ^= 1
    files[name] = bytes(data)


# ---- the table ---------------------------------------------------------------------------------------
@dataclass
class Row:
    check: str
    trials: int = 0
    passed: int = 0
    figures: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def trial(self, problems: list[str], what: str) -> None:
        self.trials += 1
        self.passed += not problems
        self.failures += [f"{what}: {p}" for p in problems[:2]]

    @property
    def ok(self) -> bool:
        return self.trials > 0 and self.passed == self.trials


def markdown(rows: Sequence[Row]) -> str:
    lines = ["| check | trials | passed | figures |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.check} | {r.trials} | {r.passed}/{r.trials} {'ok' if r.ok else 'FAIL'} | "
              f"{'; '.join(r.figures)} |" for r in rows]
    return "\n".join(lines)


# ---- DreamBooth --------------------------------------------------------------------------------------------
class DreamBooth:
    """Tiny DreamBooth data, base checkpoint and the uninterrupted reference run (whose class images
    are the reference set of ``classimg`` and the shared, complete class folder of the other checks)."""

    def __init__(self, root: Path, tamper: bool):
        self.root = root
        self.instance = make_images(root / "instance", 2)
        self.base = base_checkpoint(root / "base.ckpt")
        self.reg = root / "reg"
        done = main_py(self.args(root / "ref"), root / "ref" / "run.log",
                       conditions={"events": more_than(events(root / "ref")),
                                   "first_image": lambda: any(self.reg.glob("class_*.png")),
                                   "all_images": lambda: len(list(self.reg.glob("class_*.png"))) >= 6,
                                   "step1": lambda: any((root / "ref").glob("*/checkpoints/step-000001.ckpt"))})
        if done.code != 0:
            raise RuntimeError(f"the reference DreamBooth run failed:\n{done.stderr[-3000:]}")
        self.run, self.seen = resumable_run(root / "ref"), done.seen  # seen: seconds after start
        self.scalars = read_all_scalars(self.run)
        self.state = load_checkpoint(self.run / "checkpoints" / "last.ckpt")
        self.images = {p.name: p.read_bytes() for p in self.reg.iterdir()}
        if tamper:
            tamper_scalars(self.scalars)
            tamper_bytes(self.images)

    def args(self, logdir: Path, reg: Path | None = None, *extra: str) -> list[str]:
        return ["--base", DREAMBOOTH_TINY, "-t", "--actual_resume", self.base, "--data_root", self.instance,
                "--reg_data_root", reg or self.reg, "--class_word", "dog", "-l", logdir, *DREAMBOOTH, *extra]

    def compare(self, logdir: Path) -> list[str]:
        """The resumed run under ``logdir`` against the reference; no temporaries left."""
        run = resumable_run(logdir)
        if run is None:
            return ["no run with a last.ckpt"]
        problems = scalar_differences(self.scalars, read_all_scalars(run))
        try:
            problems += state_differences(self.state, load_checkpoint(run / "checkpoints" / "last.ckpt"))
        except CheckpointError as err:
            problems.append(str(err))
        left = temporaries(run / "checkpoints")
        return problems + ([f"temporaries left: {[p.name for p in left]}"] if left else [])

    def resume(self, logdir: Path, log: Path, extra: Sequence[str] = (), **kw: Any) -> Done:
        """``main.py -r`` of the run under ``logdir``, or a fresh start when it has no checkpoint yet."""
        run = resumable_run(logdir)
        args = ["-r", run, "-t", *extra] if run is not None else self.args(logdir, None, *extra)
        return main_py(args, log, **kw)


def check_sigkill(ctx: "Context") -> Row:
    db, row, kills, steps = ctx.dreambooth(), Row("SIGKILL at a random moment, resumed (`main.py -r`)"), 0, []
    window = db.seen["exit"] - db.seen["events"]
    for t in range(ctx.trials(20)):
        logdir = ctx.tmp / f"sigkill{t}"
        for k in range(2 if t % 3 == 1 else 1):
            done = db.resume(logdir, logdir / f"kill{k}.log", conditions={"events": more_than(events(logdir))},
                             until="events", signum=signal.SIGKILL, delay=ctx.rng.uniform(0, window))
            kills += "signal_sent" in done.seen
            steps.append(last_step(resumable_run(logdir)))
        done = db.resume(logdir, logdir / "final.log")
        row.trial(db.compare(logdir) + ([f"exit {done.code}"] if done.code else []), f"trial {t}")
    landed = [s for s in steps if s is not None]
    twice = sum(t % 3 == 1 for t in range(row.trials))
    row.figures = [f"{kills} kills in {row.trials} runs ({twice} killed twice)",
                   f"last.ckpt at kill: steps {min(landed, default='-')}-{max(landed, default='-')} of {STEPS}, "
                   f"{len(steps) - len(landed)} before the first checkpoint (started again)",
                   "losses, lr, weights, EMA, optimizer bit-exact"]
    return row


def check_save(ctx: "Context") -> Row:
    db, row, inside, left = ctx.dreambooth(), Row("SIGKILL inside a checkpoint write, resumed"), 0, 0
    for t in range(ctx.trials(8)):
        logdir = ctx.tmp / f"save{t}"
        step = int(ctx.rng.integers(2, STEPS))  # after step 1: a last.ckpt exists
        writing = lambda: any(logdir.glob(f"*/checkpoints/.step-{step:06d}.ckpt.*.tmp"))  # noqa: E731, B023
        done = db.resume(logdir, logdir / "kill.log", conditions={"writing": writing}, until="writing",
                         signum=signal.SIGKILL, delay=ctx.rng.uniform(0, 0.05))
        inside += bool(done.seen.get("inside"))
        run = resumable_run(logdir)
        left += len(temporaries(run / "checkpoints")) if run else 0
        problems = [] if run is None or last_step(run) >= 0 else ["last.ckpt unreadable after the kill"]
        done = db.resume(logdir, logdir / "final.log")
        row.trial(problems + db.compare(logdir) + ([f"exit {done.code}"] if done.code else []), f"trial {t}")
    row.figures = [f"{inside}/{row.trials} kills inside a write ({left} temporaries left by them, all removed "
                   "on resume)", "last.ckpt always readable, resume bit-exact"]
    return row


def check_signals(ctx: "Context") -> Row:
    db, row, clean = ctx.dreambooth(), Row("SIGTERM / SIGINT mid-training, resumed"), 0
    window = db.seen["exit"] - db.seen["step1"]
    for t in range(ctx.trials(4)):
        logdir, signum = ctx.tmp / f"signal{t}", (signal.SIGTERM, signal.SIGINT)[t % 2]
        step1 = lambda: any(logdir.glob("*/checkpoints/step-000001.ckpt"))  # noqa: E731, B023
        done = db.resume(logdir, logdir / "stop.log", conditions={"step1": step1}, until="step1", signum=signum,
                         delay=ctx.rng.uniform(0, 0.7 * window))
        step = last_step(resumable_run(logdir))
        stopped = done.code == 0 and "Stop signal received: saving" in done.stderr
        clean += stopped
        problems = [] if stopped or step == STEPS else [f"{signum.name}: exit {done.code}, last.ckpt {step}"]
        done = db.resume(logdir, logdir / "final.log")
        row.trial(problems + db.compare(logdir) + ([f"exit {done.code}"] if done.code else []), f"trial {t}")
    row.figures = [f"{clean}/{row.trials} stopped at a step boundary with last.ckpt saved (exit 0)"
                   + (", the others after training had ended" if clean < row.trials else ""), "resume bit-exact"]
    return row


def check_disk(ctx: "Context") -> Row:
    db, row, lines = ctx.dreambooth(), Row("file size limit (a full disk) during a checkpoint write"), []
    size = (db.run / "checkpoints" / "last.ckpt").stat().st_size
    for t in range(ctx.trials(2)):
        logdir = ctx.tmp / f"disk{t}"
        first = main_py(db.args(logdir, None, "lightning.trainer.max_steps=2"), logdir / "first.log")
        run = resumable_run(logdir)
        before = sha256(run / "checkpoints" / "last.ckpt")
        limit = int(ctx.rng.integers(1 << 20, size))  # the limit is per file: small files are written
        log = logdir / "full.log"
        done = watch(spawn(ROOT / "main.py", ["-r", run, "-t", f"lightning.trainer.max_steps={STEPS}"], log,
                           file_size=limit), log)
        errors = [ln for ln in done.stderr.splitlines() if ln.startswith("main.py: error:")]
        lines += errors[:1]
        problems = [f"first run: exit {first.code}"] if first.code else []
        problems += [] if done.code == 1 else [f"exit {done.code} (expected 1)"]
        problems += ["a traceback"] if "Traceback" in done.stderr else []
        problems += [] if len(errors) == 1 and "File too large" in errors[0] and "step-000003.ckpt" in errors[0] \
            else [f"error lines {errors}"]
        problems += [] if sha256(run / "checkpoints" / "last.ckpt") == before else ["last.ckpt changed"]
        problems += [f"temporaries left: {temporaries(run / 'checkpoints')}"] if temporaries(run / "checkpoints") else []
        done = db.resume(logdir, logdir / "final.log")
        row.trial(problems + db.compare(logdir) + ([f"exit {done.code}"] if done.code else []), f"trial {t}")
    row.figures = [f"exit 1, one line, e.g. `{lines[0][:160]}...`" if lines else "no error line",
                   "last.ckpt unchanged, resume bit-exact"]
    return row


def check_class_images(ctx: "Context") -> Row:
    db, row, codes = ctx.dreambooth(), Row("class-image generation killed and rerun"), {"SIGKILL": 0, "SIGTERM": 0,
                                                                                     "late": 0}
    window = db.seen["all_images"] - db.seen["first_image"]  # the generation, as the reference run took
    lines = []
    for t in range(ctx.trials(6)):
        reg, logdir = ctx.tmp / f"reg{t}", ctx.tmp / f"classimg{t}"
        problems = []
        for k in range(2 if t % 3 == 2 else 1):
            signum = signal.SIGTERM if t % 3 == 1 else signal.SIGKILL
            started = lambda: any(reg.glob("class_*.png")) or bool(temporaries(reg))  # noqa: E731, B023
            done = main_py(db.args(logdir / str(k), reg, "lightning.trainer.max_steps=1"), logdir / f"kill{k}.log",
                           conditions={"started": started}, until="started", signum=signum,
                           delay=ctx.rng.uniform(0, window))
            codes[signum.name] += "signal_sent" in done.seen
            if signum == signal.SIGTERM:
                stop_lines = [ln for ln in done.stderr.splitlines() if ln.startswith("main.py: stopped:")]
                lines += stop_lines
                # during generation: one line, exit 1; later: a stop at a step boundary (exit 0), or, once
                # the run is over (Lightning's teardown), the default action (exit -15; everything is saved)
                late = "`Trainer.fit` stopped" in done.stderr
                codes["late"] += late and done.code < 0
                problems += [f"SIGTERM: exit {done.code}"] if (done.code < 0 and not late) or "Traceback" in done.stderr \
                    else []
                problems += [f"SIGTERM: exit {done.code}, {len(stop_lines)} stop lines"] \
                    if "stopped while generating" in done.stderr and (done.code != 1 or len(stop_lines) != 1) else []
        done = main_py(db.args(logdir / "final", reg, "lightning.trainer.max_steps=1"), logdir / "final.log")
        problems += [f"exit {done.code}"] if done.code else []
        row.trial(problems + file_differences(db.images, reg), f"trial {t}")
    row.figures = [f"{codes['SIGKILL']} SIGKILL, {codes['SIGTERM']} SIGTERM after the first of {len(db.images)} "
                   "images appeared", "rerun: byte-identical set, no duplicate, corrupt, missing or temporary file"]
    row.figures += [f"SIGTERM: exit 1, `{lines[0][len('main.py: stopped: '):][:120]}...`"] if lines else []
    row.figures += [f"{codes['late']} SIGTERM after the run had ended: exit -15, nothing lost"] if codes["late"] else []
    return row


# ---- BLIP-2 --------------------------------------------------------------------------------------------
class Blip2World:
    """A tiny random BLIP-2 folder and coloured-square captions (the fine-tuning tests' fixtures)."""

    def __init__(self, root: Path):
        from tests.blip2_fixtures import make_tiny_blip2_folder
        from tests.test_blip2_finetune import IMAGE_SIZE, squares

        self.root, self.image_size = root, IMAGE_SIZE
        self.model = make_tiny_blip2_folder(root / "tiny", "image_tokens", seed=1)
        source = squares(root / "data", 8, seed=0)
        rows = [json.loads(line) for line in source.read_text().splitlines()]
        entries = [{"filepath": "", "filename": r["image"], "split": "train" if i < 6 else "val",
                    "sentences": [{"raw": r["caption"]}]} for i, r in enumerate(rows)]
        (root / "data" / "dataset_coco.json").write_text(json.dumps({"images": entries}))
        images = root / "eval" / "val2014"
        images.mkdir(parents=True)
        for i, r in enumerate(rows):
            shutil.copyfile(root / "data" / r["image"], images / f"COCO_val2014_{i + 1:012d}.png")
        self.annotations = root / "eval" / "coco_karpathy_test.json"
        self.annotations.write_text(json.dumps([{"image": f"val2014/COCO_val2014_{i + 1:012d}.png",
                                                 "caption": [r["caption"], "a square"]} for i, r in enumerate(rows)]))

    def train_args(self, logdir: Path) -> list[str]:
        data = self.root / "data"
        return ["--base", ROOT / "configs/blip2/finetune_caption_coco.yaml", "-t", "--no-test", "-l", logdir,
                f"coco.annotations={data}/dataset_coco.json", f"coco.image_root={data}",
                f"coco.image_size={self.image_size}", f"model.params.pretrained={self.model}",
                "model.params.frozen_dtype=fp32", "model.params.gradient_checkpointing=false",
                "data.params.batch_size=2", "data.params.num_workers=0", "lightning.trainer.accelerator=cpu",
                "lightning.trainer.precision=32", f"lightning.trainer.max_steps={BLIP2_STEPS}",
                "lightning.trainer.max_epochs=2", "lightning.trainer.limit_val_batches=0",
                "lightning.trainer.log_every_n_steps=1", "lightning.checkpoint.every_n_steps=1",
                "lightning.checkpoint.keep_last=2"]

    def eval_args(self, out: Path) -> list[str]:
        return ["coco", "--model", self.model, "--annotations", self.annotations, "--images", self.root / "eval",
                "--out", out, "--batch_size", "2", "--num_workers", "0"]


def check_blip2(ctx: "Context") -> Row:
    world, row, kills = ctx.blip2(), Row("BLIP-2 fine-tuning SIGKILLed, resumed"), 0
    ref = ctx.tmp / "blip2_ref"
    done = main_py(world.train_args(ref), ref / "run.log", conditions={"events": more_than(events(ref))})
    if done.code:
        raise RuntimeError(f"the reference BLIP-2 run failed:\n{done.stderr[-3000:]}")
    scalars, state = read_all_scalars(resumable_run(ref)), load_checkpoint(resumable_run(ref) / "checkpoints/last.ckpt")
    if ctx.tamper:
        tamper_scalars(scalars)
    window = done.seen["exit"] - done.seen["events"]
    for t in range(ctx.trials(3)):
        logdir = ctx.tmp / f"blip2_{t}"
        for k in range(2 if t % 3 == 1 else 1):
            run = resumable_run(logdir)
            args = ["-r", run, "-t"] if run is not None else world.train_args(logdir)
            done = main_py(args, logdir / f"kill{k}.log", conditions={"events": more_than(events(logdir))},
                           until="events", signum=signal.SIGKILL, delay=ctx.rng.uniform(0, window))
            kills += "signal_sent" in done.seen
        run = resumable_run(logdir)
        done = main_py(["-r", run, "-t"] if run else world.train_args(logdir), logdir / "final.log")
        run = resumable_run(logdir)
        problems = [f"exit {done.code}"] if done.code else []
        if run is not None:
            problems += scalar_differences(scalars, read_all_scalars(run))
            problems += state_differences(state, load_checkpoint(run / "checkpoints" / "last.ckpt"))
            problems += [f"temporaries left {temporaries(run / 'checkpoints')}"] if temporaries(run / "checkpoints") else []
        row.trial(problems or ([] if run else ["no run"]), f"trial {t}")
    row.figures = [f"{kills} kills in {row.trials} runs of {BLIP2_STEPS} steps", "loss, lr, weights, optimizer "
                   "bit-exact"]
    return row


def check_eval(ctx: "Context") -> Row:
    world, row, kills = ctx.blip2(), Row("`evaluate_blip2.py` SIGKILLed, rerun"), 0
    script, ref = ROOT / "scripts" / "evaluate_blip2.py", ctx.tmp / "eval_ref"
    partial = lambda out: out / "results.partial.jsonl"  # noqa: E731
    done = watch(spawn(script, world.eval_args(ref), ref / "run.log"), ref / "run.log",
                 conditions={"partial": lambda: partial(ref).exists()})
    if done.code:
        raise RuntimeError(f"the reference evaluation failed:\n{done.stderr[-3000:]}")
    expected = {name: (ref / name).read_bytes() for name in ("results.json", "metrics.json")}
    if ctx.tamper:
        results = json.loads(expected["results.json"])
        results[0]["caption"] += " x"
        expected["results.json"] = json.dumps(results).encode()
    window = done.seen["exit"] - done.seen["partial"]
    for t in range(ctx.trials(6)):
        out = ctx.tmp / f"eval{t}"
        for k in range(2 if t % 3 == 1 else 1):
            log = out.parent / f"eval{t}_kill{k}.log"
            started = lambda: partial(out).exists()  # noqa: E731, B023
            done = watch(spawn(script, world.eval_args(out), log), log, conditions={"started": started},
                         until="started", signum=signal.SIGKILL, delay=ctx.rng.uniform(0, window))
            kills += "signal_sent" in done.seen
        log = out.parent / f"eval{t}_final.log"
        done = watch(spawn(script, world.eval_args(out), log), log)
        problems = [f"exit {done.code}: {done.stderr.strip().splitlines()[-1:]}"] if done.code else []
        problems += [f"{n} differs" for n, data in expected.items() if not (out / n).is_file()
                     or (out / n).read_bytes() != data]
        keys = [json.loads(line)["key"] for line in partial(out).read_text().splitlines()[1:]] \
            if partial(out).is_file() else []
        problems += [] if sorted(keys) == sorted(set(keys)) else ["an item twice in the partial file"]
        problems += [f"temporaries left {temporaries(out)}"] if temporaries(out) else []
        row.trial(problems, f"trial {t}")
    row.figures = [f"{kills} kills in {row.trials} evaluations of {len(json.loads(expected['results.json']))} "
                   "images", "results.json, metrics.json byte-equal; each item once"]
    return row


# ---- run folders ------------------------------------------------------------------------------------------------
def _race(parent: str, barrier: Any, queue: Any) -> None:
    from core.trainer import new_run_folder

    barrier.wait()
    queue.put(str(new_run_folder(Path(parent), "2026-01-01T00-00-00_same")))


def check_logdirs(ctx: "Context") -> Row:
    db_base = ctx.tmp / "logdirs_base.ckpt"
    if not db_base.exists():
        base_checkpoint(db_base)
    row, same_second = Row("runs of the same name started together"), 0
    for t in range(ctx.trials(5)):
        logdir = ctx.tmp / f"pair{t}"
        args = ["--base", DREAMBOOTH_TINY, "--actual_resume", db_base, "-n", "same", "-l", logdir]
        procs = [spawn(ROOT / "main.py", args, logdir / f"run{i}.log") for i in range(2)]
        codes = [watch(p, logdir / f"run{i}.log").code for i, p in enumerate(procs)]
        runs = sorted(p for p in logdir.iterdir() if p.is_dir())
        same_second += len({p.name.split("_same")[0] for p in runs}) == 1
        problems = [f"exit {codes}"] if any(codes) else []
        problems += [] if len(runs) == 2 and all(len(list((r / "configs").glob("*.yaml"))) == 1 for r in runs) \
            else [f"run folders {[r.name for r in runs]}"]
        row.trial(problems, f"pair {t}")
    races, shared = ctx.trials(100), 0
    mp = multiprocessing.get_context("fork")
    for t in range(races):
        parent, barrier, queue = ctx.tmp / f"race{t}", mp.Barrier(4), mp.Queue()
        procs = [mp.Process(target=_race, args=(str(parent), barrier, queue)) for _ in range(4)]
        for p in procs:
            p.start()
        folders = [queue.get(timeout=60) for _ in procs]
        for p in procs:
            p.join()
        shared += len(set(folders)) != 4
        row.trial([] if len(set(folders)) == 4 else [f"shared {folders}"], f"race {t}")
    row.figures = [f"main.py: {ctx.trials(5)} pairs, {same_second} in the same second, separate folders each",
                   f"new_run_folder: {races} races of 4 processes at a barrier, {shared} shared a folder"]
    return row


# ---- driver -----------------------------------------------------------------------------------------------------
CHECKS = {"sigkill": check_sigkill, "save": check_save, "signals": check_signals, "disk": check_disk,
          "classimg": check_class_images, "blip2": check_blip2, "eval": check_eval, "logdirs": check_logdirs}
QUICK_TRIALS = 2


@dataclass
class Context:
    tmp: Path
    rng: np.random.Generator
    quick: bool
    tamper: bool
    fixed_trials: int | None
    _dreambooth: DreamBooth | None = None
    _blip2: Blip2World | None = None

    def trials(self, full: int) -> int:
        return self.fixed_trials or (min(full, QUICK_TRIALS) if self.quick else full)

    def dreambooth(self) -> DreamBooth:
        if self._dreambooth is None:
            self._dreambooth = DreamBooth(self.tmp / "dreambooth", self.tamper)
        return self._dreambooth

    def blip2(self) -> Blip2World:
        if self._blip2 is None:
            self._blip2 = Blip2World(self.tmp / "blip2")
        return self._blip2


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK_TRIALS} trials of each check")
    p.add_argument("--trials", type=int, help="trials of each check (default: 20 SIGKILL, 10 save, ...)")
    p.add_argument("--only", help=f"comma-separated checks: {', '.join(CHECKS)}")
    p.add_argument("--out", help="also write the table to this markdown file")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--tamper", action="store_true", help="corrupt the references: every compared check must fail")
    p.add_argument("--keep", help="work in this folder and keep it (default: a temporary folder)")
    opt = p.parse_args(argv)
    names = opt.only.split(",") if opt.only else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown or (opt.trials is not None and opt.trials < 1):
        p.error(f"--only {unknown[0]}: not a check ({', '.join(CHECKS)})" if unknown else "--trials must be >= 1")
    opt.names = names
    return opt


def main(argv: Sequence[str] | None = None) -> int:
    opt = parse_args(argv)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="reliability-") as scratch:
        tmp = Path(opt.keep or scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        ctx = Context(tmp, np.random.default_rng(opt.seed), opt.quick, opt.tamper, opt.trials)
        rows = []
        for name in opt.names:
            t0 = time.monotonic()
            row = CHECKS[name](ctx)
            row.figures.append(f"{time.monotonic() - t0:.0f} s")
            rows.append(row)
            print(f"{name}: {row.passed}/{row.trials}" + "".join(f"\n  {f}" for f in row.failures[:5]), flush=True)
    table = markdown(rows)
    footer = (f"\n\n{len(rows)} checks, {sum(r.trials for r in rows)} trials, {time.monotonic() - start:.0f} s "
              f"(seed {opt.seed}{', references tampered' if opt.tamper else ''}); CPU, OMP_NUM_THREADS=1")
    print(table + footer)
    if opt.out:
        Path(opt.out).write_text(table + footer + "\n")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
