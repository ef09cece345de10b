"""The installed project runs its entry points from anywhere: no sys.path edits, no PYTHONPATH."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the files and modules as users run them (each script is also an installed command below)
SCRIPTS = ["main.py", "scripts/sample.py", "scripts/caption.py", "scripts/evaluate_blip2.py"]
COMMANDS = ["db2-train", "db2-sample", "db2-export", "db2-export-lora", "db2-caption", "db2-retrieve",
            "db2-export-blip2", "db2-evaluate-toy", "db2-evaluate-blip2"]
MODULES = ["blip2.export", "toy.shapes", "benchmarks.bench_sd", "benchmarks.memory_sd"]


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_run_outside_the_repository(script, tmp_path):
    proc = run([sys.executable, str(ROOT / script), "--help"], tmp_path)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("module", MODULES)
def test_modules_run_outside_the_repository(module, tmp_path):
    proc = run([sys.executable, "-m", module, "--help"], tmp_path)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("command", COMMANDS)
def test_installed_commands(command, tmp_path):
    exe = Path(sys.executable).parent / command
    assert exe.is_file(), f"{exe}: not installed (pip install -e . installs the console scripts of setup.py)"
    proc = run([str(exe), "--help"], tmp_path)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


def test_no_entry_point_edits_sys_path():
    files = [p for d in ("scripts", "benchmarks", "core", "ldm", "blip2", "toy", "tests") for p in (ROOT / d).rglob("*.py")]
    files.append(ROOT / "main.py")
    offenders = [str(p.relative_to(ROOT)) for p in files if "sys.path." in p.read_text() and p.name != Path(__file__).name]
    assert not offenders
