"""The frozen-stage behaviour shared by detkit's backbones."""

from __future__ import annotations

from torch import nn


class FrozenStagesBackbone(nn.Module):
    """Base for backbones with ``frozen_stages``: subclasses list the frozen modules in
    ``_frozen_modules()``; ``freeze()`` turns their gradients off and ``train()`` keeps them
    (their BatchNorm statistics included) in eval mode."""

    def _frozen_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def freeze(self) -> None:
        for module in self._frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        """Like ``nn.Module.train`` but frozen stages keep their BN layers in eval mode."""
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self
