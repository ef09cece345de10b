"""benchmarks/gpu.py in its --smoke mode (tiny models, CPU): every section runs, counts FLOPs, both
sides agree and the report is written; a failing section leaves the others; the device peak table.
benchmarks/scaling.py on tiny models: its table from measured points of each kind of sweep."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import gpu, scaling, workloads
from benchmarks.bench_sd import TOLERANCE


def test_smoke_runs_every_section_and_writes_the_report(tmp_path):
    out = tmp_path / "gpu.md"
    args = gpu.parse_args(["--smoke", "--peak_tflops", "1", "--sections", "sd-bf16", "blip2", "memory",
                           "--out", str(out)])
    sections = gpu.run_all(args)
    assert [s.status for s in sections] == ["ok", "ok", "ok"]
    sd, blip2, mem = sections
    (train, sampling), (caption, finetune) = sd.records, blip2.records
    for record in (train, sampling):
        # the model FLOPs were counted on both sides, and both count the same computation
        assert record["flops"] > 0 and record["flops_ours"] == pytest.approx(record["flops"], rel=0.01)
    # fine-tuning: ours runs OPT's output head on the caption positions only, not on the queries too
    assert 0.5 * finetune["flops"] < finetune["flops_ours"] < finetune["flops"]
    assert caption["flops"] > 0 and caption["flops_ours"] > 0  # beam search: the sides' own ways differ
    assert all(min(r["seconds"].values()) > 0 for r in sd.records + blip2.records)
    assert max(train["errors"].values()) <= TOLERANCE[torch.bfloat16] and sampling["errors"]["latents"] > 0
    assert finetune["errors"]["grads"] <= 1e-4 and "2/2 captions equal" in blip2.text
    (row,) = mem.records
    assert row["simulated"]["ours"] == pytest.approx(row["real"]["ours"], rel=0.05)
    text = out.read_text()
    for s in sections:
        assert f"## {s.title}" in text and s.text in text
    assert "model FLOP utilisation" in text and "%" in sd.text and "it/s" in sd.text


def test_a_failing_section_leaves_the_others(tmp_path, monkeypatch, capsys):
    real, calls = workloads.blip2_models, []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("no such model")
        return real(*args, **kwargs)

    monkeypatch.setattr(workloads, "blip2_models", fails_once)
    out = tmp_path / "gpu.md"
    assert gpu.main(["--smoke", "--sections", "blip2", "blip2", "--out", str(out)]) == 1
    first, second = out.read_text().split("## ")[1:]
    assert "failed: RuntimeError: no such model" in first and second.splitlines()[2].startswith("ok")
    assert "n/a" in second  # no peak for a CPU without --peak_tflops: no utilisation


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A10", 125.0),
                                        ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0),
                                        ("NVIDIA GeForce RTX 4090", 165.0), ("Some New GPU", None)])
def test_device_peaks_by_name(name, peak):
    assert gpu.peak_tflops(name) == peak


def test_scaling_tiny_measures_each_kind_of_sweep(tmp_path):
    out = tmp_path / "scaling.md"
    sweeps = ["sampling-px", "dreambooth-batch", "caption-beams"]
    png = tmp_path / "scaling.png"
    assert scaling.main(["--tiny", "--repeats", "1", "--steps", "1", "--new_tokens", "2", "--sweeps", *sweeps,
                         "--out", str(out), "--plot", str(png)]) == 0
    with Image.open(png) as figure:  # one column a sweep, time above memory
        assert figure.format == "PNG" and figure.width > 1.5 * figure.height > 300
        pixels = np.asarray(figure.convert("RGB")).reshape(-1, 3).astype(int)
        coloured = (pixels.max(axis=1) - pixels.min(axis=1)) > 80  # the plotted lines, not black or grey
        assert coloured.sum() > 200
    lines = [line for line in out.read_text().splitlines() if line.startswith("| ") and "sweep" not in line]
    assert [line.split(" | ")[0].removeprefix("| ") for line in lines] == [
        s for s in sweeps for _ in scaling.SWEEPS[s][5]]
    for line in lines:
        cells = line.split(" | ")
        assert float(cells[3]) > 0 and float(cells[6]) > 0 and float(cells[7]) > 0  # seconds, peak MiB
    assert "captions equal" in out.read_text() and "grads" in out.read_text()


def test_a_disagreement_fails_its_section_and_keeps_the_figures(monkeypatch):
    real = workloads.blip2_models

    def perturbed(*args, **kwargs):
        ours, ref = real(*args, **kwargs)
        with torch.no_grad():
            ref.language_projection.weight.mul_(1.5)
        return ours, ref

    monkeypatch.setattr(workloads, "blip2_models", perturbed)
    (section,) = gpu.run_all(gpu.parse_args(["--smoke", "--sections", "blip2"]))
    assert section.status.startswith("failed: RuntimeError: stage-2 fine-tuning step")
    assert "MISMATCH" in section.text and "beam-5 captioning" in section.text
