"""benchmarks/bench_sd.py's UNet-call row and its within-round ratio (the other rows run the same way,
for minutes, so only by hand)."""
import torch

from benchmarks import bench_sd
from benchmarks.common import Timing, paired_ratio


def test_the_within_round_ratio_cancels_a_drift_between_rounds():
    # the machine slows down 10x in round 2 and ours is 10 % slower in round 3: the ratio of the medians
    # reads 1.1, the rounds say 1.0
    timings = {"ours": Timing(seconds=[1.0, 10.0, 1.1]), "diffusers": Timing(seconds=[1.0, 10.0, 1.0])}
    assert timings["ours"].median / timings["diffusers"].median == 1.1
    assert paired_ratio(timings["ours"], timings["diffusers"]) == 1.0


def test_the_forward_row_agrees_and_reports_both_ratios(capsys):
    bench_sd.main(["--only", "forward", "--repeats", "2", "--channels_last"])  # both sides channels-last
    out = capsys.readouterr().out
    assert "params, fp32, channels_last; " in out
    row = next(line for line in out.splitlines() if line.startswith("| UNet forward (no grad), batch 2 (x2 for CFG)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) > 0 and float(cells[2]) > 0 and cells[-1].startswith("eps ")
    assert float(cells[-1].removeprefix("eps ")) < bench_sd.TOLERANCE[torch.float32]
    assert "# forward seconds per repeat: ours " in out and "within a round, median " in out
