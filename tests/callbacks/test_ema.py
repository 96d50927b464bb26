"""The EMA callback (flowmap_lit.callbacks.EMA): updates, the averaged-weights swap, state round trip, warmup."""

import copy

import lightning.pytorch as pl
import torch

from flowmap_lit.callbacks import EMA


class _Lin(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(3, 1, bias=False)

    def ema_network(self):
        return self.net


def test_ema_update_swap_and_state_roundtrip():
    module = _Lin()
    ema = EMA(decay=0.5, warmup=False)
    with torch.no_grad():
        module.net.weight.fill_(0.0)
    ema.update(module)  # shadow = 0
    with torch.no_grad():
        module.net.weight.fill_(4.0)
    ema.update(module)  # 0.5 * 0 + 0.5 * 4 = 2
    ema.update(module)  # 0.5 * 2 + 0.5 * 4 = 3
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 3), 3.0))
    with ema.averaged(module):
        assert torch.allclose(module.net.weight, torch.full((1, 3), 3.0))
    assert torch.allclose(module.net.weight, torch.full((1, 3), 4.0))

    restored = EMA(decay=0.5, warmup=False)
    restored.load_state_dict(copy.deepcopy(ema.state_dict()))
    assert restored.num_updates == 3
    with restored.averaged(module):
        assert torch.allclose(module.net.weight, torch.full((1, 3), 3.0))
    # Warmup ramps the decay: (1 + n) / (10 + n).
    warm = EMA(decay=0.999)
    assert warm.current_decay() == 0.1
