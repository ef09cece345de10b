"""LitEma: the CompVis update rule, sd-v1 buffer names, swapping EMA weights in and out."""
import torch
from torch import nn

from ldm.modules.ema import LitEma


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_buffer_names_are_parameter_names_without_dots():
    ema = LitEma(_net())
    assert set(ema.state_dict()) == {"decay", "num_updates", "0weight", "0bias", "2weight", "2bias"}


def test_update_rule_with_warmup():
    net = _net()
    ema = LitEma(net, decay=0.9)
    start = net[0].weight.detach().clone()
    expected = start.clone()
    for n in range(1, 40):
        with torch.no_grad():
            net[0].weight.add_(0.1)
        d = min(0.9, (1 + n) / (10 + n))
        expected = expected - (1 - d) * (expected - net[0].weight)
        ema(net)
    assert int(ema.num_updates) == 39
    torch.testing.assert_close(ema.state_dict()["0weight"], expected)


def test_swapped_into_restores_the_trained_weights():
    net = _net()
    ema = LitEma(net)
    trained = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for b in ema.buffers():
            if b.is_floating_point() and b.ndim > 0:
                b.fill_(0.5)
    with ema.swapped_into(net):
        assert all(torch.all(p == 0.5) for p in net.parameters())
    assert all(torch.equal(p, t) for p, t in zip(net.parameters(), trained))
