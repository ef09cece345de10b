"""The BLIP-2 memory table (benchmarks/memory_blip2.py) on a tiny BLIP-2: both sides of a row compute
the same thing (one loss, one caption), the scalar replay that lets decoding run on fake tensors
refuses a run that does not line up with its twin, and the script reports sane figures."""
from __future__ import annotations

import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks import memory_blip2 as mb


def same_weights(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    """Ours takes transformers' random weights (the same keys), each in its own dtype."""
    ours.load_state_dict(ref.state_dict(), strict=True)


def trainable(module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["stage2/fp32/nockpt/adamw", "finetune/fp32/ckpt/adamw"])
def test_both_sides_train_the_same_parameters_on_the_same_loss(name):
    row = mb.Row.parse(name)
    ref = mb.reference_training("tiny", row)
    ours = mb.our_training("tiny", row)
    same_weights(ours.network, ref.network)
    assert trainable(ours.network) == trainable(ref.network) - {"language_model.lm_head.weight"}
    assert ("vision_model.encoder.layers.0.mlp.fc1.weight" in trainable(ours.network)) == (row.mode == "finetune")
    loss, ref_loss = ours.job.forward(), ref.job.forward()
    assert loss.item() > 0 and loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    loss.backward()
    ref_loss.backward()
    grads = dict(ours.network.named_parameters())
    for key, p in ref.network.named_parameters():
        if p.requires_grad and key in grads:
            # summation order differs (ours runs the head on the text positions only), and these tiny
            # models have gradients of 1e7 where single entries round 5e-4 apart, beside others of 1e-14
            scale = p.grad.abs().max().item()
            torch.testing.assert_close(grads[key].grad, p.grad, rtol=1e-3, atol=1e-6 + 1e-5 * scale)


def test_both_sides_decode_the_same_fixed_length_captions():
    row = mb.Row.parse("caption/224/fp16")
    config = mb.model_config("tiny", row)
    torch.manual_seed(0)
    ref = mb.reference_captioner(config, torch.float32)
    ours = mb.our_captioner(config, torch.float32)
    same_weights(ours, ref)
    x = mb.pixels("tiny", row)
    ids, ref_ids = mb.run_caption("ours", ours, x, "tiny"), mb.run_caption("transformers", ref, x, "tiny")
    assert ids.shape == ref_ids.shape == (mb.TINY_BATCH, mb.NEW_TOKENS["tiny"])
    assert torch.equal(ids, ref_ids)


def test_scalar_replay_keys_values_by_line_and_refuses_an_unknown_read():
    def decide(x: torch.Tensor) -> list[bool]:
        first = [bool((x > 0).all()) for _ in range(2)]  # one line read twice
        return first + [bool((x < 0).any())]

    recorder = mb.Scalars()
    with recorder:
        assert decide(torch.ones(3)) == [True, True, False]
    assert sorted(len(v) for v in recorder.values.values()) == [1, 2]
    with FakeTensorMode():
        x = torch.ones(3)
        replay = mb.Scalars(recorder.values)
        with replay:
            assert decide(x) == [True, True, False]
        replay.check_done()
        with mb.Scalars({}), pytest.raises(RuntimeError, match="reads a scalar at .*test_memory_blip2.py"):
            bool(x.all())


def test_memory_blip2_runs_end_to_end_and_prints_ratios(tmp_path, capsys):
    out = tmp_path / "memory.json"
    rows = ["caption/364/bf16"]
    assert mb.main(["--tiny", "--rows", *rows, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert [r["row"] for r in results] == rows
    for r in results:
        assert f"| {r['row']} |" in printed and f"{r['ratio']:.2f}" in printed
        ours, ref = r["ours"], r["transformers"]
        assert ours["peak"] > ours["parts"]["params"] > 0 and ref["peak"] > ref["parts"]["params"] > 0
        assert r["ratio"] == pytest.approx(ours["peak"] / ref["peak"])
    (caption,) = results
    assert caption["batch"] == mb.TINY_BATCH
    for side in ("ours", "transformers"):  # inference: no gradients, no optimizer state
        assert caption[side]["parts"].get("grads", 0) == 0 and caption[side]["parts"].get("optimizer", 0) == 0


def test_memory_blip2_refuses_an_unknown_row(capsys):
    assert mb.main(["--tiny", "--rows", "caption/512/fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "caption/512/fp16" in err[0] and "224|364" in err[0]
