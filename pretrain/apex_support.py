"""NVIDIA apex, optional: its fused LAMB and fused LayerNorm where a configuration asks.

Two switches, each in the file that owns the setting:

- the DeepSpeed JSON's optimizer, ``"type": "apex.FusedLAMB"`` (its ``params`` go to
  ``apex.optimizers.FusedLAMB``): the trainer builds that optimizer and hands it to
  ``deepspeed.initialize`` as a client optimizer, with the scheduler, ZeRO and precision
  still DeepSpeed's (ZeRO needs ``"zero_allow_untested_optimizer": true`` for it);
- the model config's ``"kernels": "apex"``: every LayerNorm is apex's ``FusedLayerNorm``
  (the same parameters and checkpoints; apex itself falls back to PyTorch's LayerNorm
  for CPU tensors).

Without apex, a configuration that asks for it fails before any work with one line that
says how to install it; a configuration that does not ask never imports apex.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

import torch
from torch import nn

LAMB_TYPE = "apex.FusedLAMB"  # the DeepSpeed JSON's optimizer type that selects apex's LAMB
INSTALL = (
    "install it on a CUDA machine with `pip install -v --no-build-isolation "
    "--config-settings '--build-option=--cpp_ext' --config-settings "
    "'--build-option=--cuda_ext' git+https://github.com/NVIDIA/apex` (it builds against "
    "the installed torch and CUDA)"
)


class ApexUnavailable(RuntimeError):
    """A configuration asks for apex and it is not installed."""


def available() -> bool:
    return importlib.util.find_spec("apex") is not None


def require(what: str) -> None:
    """Raise :class:`ApexUnavailable` naming ``what`` asked for apex, unless it is installed."""
    if not available():
        raise ApexUnavailable(f"{what} asks for NVIDIA apex, which is not installed: {INSTALL}")


def asks_for_lamb(deepspeed_config: dict) -> bool:
    return (deepspeed_config.get("optimizer") or {}).get("type") == LAMB_TYPE


def fused_layer_norm(size: int, eps: float) -> nn.Module:
    """apex's FusedLayerNorm over the last dimension (``weight`` and ``bias`` as nn.LayerNorm)."""
    require('the model config\'s "kernels": "apex"')
    from apex.normalization import FusedLayerNorm

    return FusedLayerNorm(size, eps=eps)


def client_optimizer(
    deepspeed_config: dict, parameters: Iterable[nn.Parameter]
) -> tuple[torch.optim.Optimizer | None, dict]:
    """(optimizer, config for ``deepspeed.initialize``): apex's FusedLAMB and the config
    without its optimizer section when the config asks for it, else (None, the config)."""
    if not asks_for_lamb(deepspeed_config):
        return None, deepspeed_config
    require(f'the DeepSpeed optimizer "type": "{LAMB_TYPE}"')
    from apex.optimizers import FusedLAMB

    params = dict(deepspeed_config["optimizer"].get("params", {}))
    rest = {k: v for k, v in deepspeed_config.items() if k != "optimizer"}
    return FusedLAMB(list(parameters), **params), rest


__all__ = [
    "INSTALL",
    "LAMB_TYPE",
    "ApexUnavailable",
    "asks_for_lamb",
    "available",
    "client_optimizer",
    "fused_layer_norm",
    "require",
]
