"""The installed project runs its entry points from anywhere: no sys.path edits, no PYTHONPATH."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the files and modules as users run them (each script is also an installed command below)
SCRIPTS = ["main.py", "scripts/sample.py", "scripts/caption.py", "scripts/evaluate_blip2.py"]
COMMANDS = ["db2-train", "db2-sample", "db2-export", "db2-export-lora", "db2-caption", "db2-retrieve",
            "db2-export-blip2", "db2-evaluate-toy", "db2-evaluate-blip2"]
# commands whose function a script file above runs already outside the repository: checked to be that
# function, not run again (each run is seconds of imports)
SAME_AS_SCRIPT = {"db2-train": ("main.py", "core.trainer"), "db2-sample": ("scripts/sample.py", "scripts.sample"),
                  "db2-caption": ("scripts/caption.py", "scripts.caption"),
                  "db2-evaluate-blip2": ("scripts/evaluate_blip2.py", "scripts.evaluate_blip2")}
MODULES = ["blip2.export", "toy.shapes", "benchmarks.bench_sd", "benchmarks.memory_sd", "benchmarks.memory_blip2",
           "benchmarks.checkpoint_size"]


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def command_path(command: str) -> Path:
    return Path(sys.executable).parent / command


# Runs each script file and module with --help in one interpreter, from wherever it is started, as
# ``python FILE`` / ``python -m MODULE`` would (``__main__``); writes {name: [exit status, stdout, stderr]}
# as JSON to argv[2]. One process instead of one each: each spends its seconds importing torch.
HELP_DRIVER = """
import contextlib, io, json, runpy, sys
todo, out, results = json.loads(sys.argv[1]), sys.argv[2], {}
for kind, name in todo:
    sys.argv, stdout, stderr = [name, "--help"], io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            if kind == "module":
                runpy.run_module(name, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(name, run_name="__main__")
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    except BaseException as err:
        code, stderr = 1, io.StringIO(repr(err))
    results[name] = [code, stdout.getvalue(), stderr.getvalue()]
open(out, "w").write(json.dumps(results))
"""


@pytest.fixture(scope="module")
def helps(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """``--help`` of every script, module and command, from a folder outside the repository: the
    scripts and modules in one interpreter (``HELP_DRIVER``), each installed command in its own
    process (its launcher is what is tested), two processes at a time."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    todo = [("script", str(ROOT / s)) for s in SCRIPTS] + [("module", m) for m in MODULES]
    report = cwd / "helps.json"
    argvs = {"driver": [sys.executable, "-c", HELP_DRIVER, json.dumps(todo), str(report)],
             **{c: [str(command_path(c)), "--help"] for c in COMMANDS
                if command_path(c).is_file() and c not in SAME_AS_SCRIPT}}
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = {name: pool.submit(run, argv, cwd) for name, argv in argvs.items()}
        procs = {name: future.result() for name, future in done.items()}
    driver = procs.pop("driver")
    assert driver.returncode == 0 and report.is_file(), driver.stderr[-2000:]
    for (kind, name), key in zip(todo, SCRIPTS + MODULES):
        code, out, err = json.loads(report.read_text())[name]
        procs[key] = subprocess.CompletedProcess([kind, name, "--help"], code, out, err)
    return procs


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_run_outside_the_repository(script, helps):
    proc = helps[script]
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("module", MODULES)
def test_modules_run_outside_the_repository(module, helps):
    proc = helps[module]
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("command", COMMANDS)
def test_installed_commands(command, helps):
    exe = command_path(command)
    assert exe.is_file(), f"{exe}: not installed (pip install -e . installs the console scripts of setup.py)"
    if command in SAME_AS_SCRIPT:
        from importlib.metadata import entry_points
        script, module = SAME_AS_SCRIPT[command]
        target = entry_points(group="console_scripts")[command].value
        assert target == f"{module}:main", target
        text = (ROOT / script).read_text()
        assert (f"from {module} import main" in text or f"def main(" in text) and "main()" in text
        assert helps[script].returncode == 0
        return
    proc = helps[command]
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


def test_no_entry_point_edits_sys_path():
    files = [p for d in ("scripts", "benchmarks", "core", "ldm", "blip2", "toy", "tests") for p in (ROOT / d).rglob("*.py")]
    files.append(ROOT / "main.py")
    offenders = [str(p.relative_to(ROOT)) for p in files if "sys.path." in p.read_text() and p.name != Path(__file__).name]
    assert not offenders
