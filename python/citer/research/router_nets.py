"""The router's training networks (what citer train-router fits) and their saved format.

features="hidden" (the paper's router, kept as the CITER ablation):
  Linear(H,2H) -> BatchNorm -> ReLU -> Dropout -> Linear(2H,H) -> Dropout -> Linear(H,1);
  p = sigmoid(that) = "the SLM's token is fine", LLM when p < τ.
features="hidden+head" (the default for new routers): the same MLP over [h, s], where s
  are the head's signals (logit of the SLM's top probability, top-1 minus top-2 logit,
  entropy; citer.kernels.routed_head.head_signals_ref), in a residual form
  p = sigmoid(c . s + MLP([h, s])) with c = (1, 0, 0) and the MLP's last layer at zero
  to start: an untrained router *is* the confidence rule (p = the top probability), and
  training can only add to it.
LinearRouter: p = sigmoid(w . h + b), the Co-LLM-style deferral head.

The folder format, the fold into the form the engine runs (RouterParams) and loading for
inference live with the engine (citer.engine.models.router); `fold()` here goes through
that same fold.
"""
import json
import os
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors.torch import save_file
from torch import nn

from citer.engine.models.router import (ARCHITECTURE, CONFIG_NAME, FEATURES, LINEAR_ARCHITECTURE, WEIGHTS_NAME,
                                        RouterParams, fold_state, read_router_folder)
from citer.kernels.routed_head import NUM_SIGNALS


class RouterMLP(nn.Module):
    def __init__(self, hidden_size: int, dropout: float = 0.1, features: str = "hidden"):
        super().__init__()
        if features not in FEATURES:
            raise ValueError(f"unknown router features {features!r}; choose one of {FEATURES}")
        h = hidden_size
        self.hidden_size, self.features = hidden_size, features
        n_in = h + (NUM_SIGNALS if self.head_signals else 0)
        self.net = nn.Sequential(
            nn.Linear(n_in, 2 * h), nn.BatchNorm1d(2 * h), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(2 * h, h), nn.Dropout(dropout), nn.Linear(h, 1),
        )
        if self.head_signals:
            self.skip = nn.Linear(NUM_SIGNALS, 1)  # c . s + its bias: starts as logit(top probability)
            with torch.no_grad():
                self.skip.weight.zero_()
                self.skip.weight[0, 0] = 1.0
                self.skip.bias.zero_()
                self.net[-1].weight.zero_()
                self.net[-1].bias.zero_()

    @property
    def head_signals(self) -> bool:
        return self.features == "hidden+head"

    def forward(self, h: torch.Tensor, signals: Optional[torch.Tensor] = None) -> torch.Tensor:
        """h [B, H] (and signals [B, NUM_SIGNALS] for a hidden+head router) -> logits [B]."""
        if not self.head_signals:
            return self.net(h).squeeze(-1)
        if signals is None:
            raise ValueError("a hidden+head router needs the head's signals")
        return (self.net(torch.cat([h, signals], -1)) + self.skip(signals)).squeeze(-1)

    def fold(self) -> RouterParams:
        """-> RouterParams (W1 [2H, H], b1 [2H], w2 [2H], b2 [], and for hidden+head
        W_sig [2H, NUM_SIGNALS], c [NUM_SIGNALS]) with BatchNorm and the last two Linears folded."""
        return fold_state(self.state_dict(), ARCHITECTURE, self.hidden_size)


class LinearRouter(nn.Module):
    """p = sigmoid(w . h + b) over the normed hidden state (Co-LLM's deferral head, as the
    probability of keeping the SLM's token). It folds into the MLP form exactly:
    relu(z) - relu(-z) = z, so W1 = [w; -w], b1 = [b; -b], w2 = [1, -1], b2 = 0."""

    features = "hidden"
    head_signals = False

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.linear = nn.Linear(hidden_size, 1)

    def forward(self, h: torch.Tensor, signals: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.linear(h).squeeze(-1)

    def fold(self) -> RouterParams:
        return fold_state(self.state_dict(), LINEAR_ARCHITECTURE, self.hidden_size)


def save_router(router: nn.Module, path: str, default_threshold: float = 0.5,
                meta: Optional[Dict[str, Any]] = None) -> None:
    """A RouterMLP or LinearRouter -> a router folder."""
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in router.state_dict().items()}
    save_file(state, os.path.join(path, WEIGHTS_NAME))
    config = {
        "architecture": LINEAR_ARCHITECTURE if isinstance(router, LinearRouter) else ARCHITECTURE,
        "hidden_size": router.hidden_size,
        "features": router.features,
        "default_threshold": default_threshold,
        "meta": meta or {},
    }
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)


def load_router_mlp(path: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """A router folder -> (its training network, RouterMLP or LinearRouter, in eval mode; its config)."""
    config, state = read_router_folder(path)
    router = (LinearRouter(config["hidden_size"]) if config["architecture"] == LINEAR_ARCHITECTURE
              else RouterMLP(config["hidden_size"], features=config["features"]))
    router.load_state_dict(state, strict=False)  # read_router_folder checked every tensor's name and shape
    return router.eval(), config
