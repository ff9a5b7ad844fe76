"""The CITER router: an MLP over the SLM's final (normed) hidden state, optionally with the
head's own signals beside it.

features="hidden" (the paper's router, kept as the CITER ablation):
  Linear(H,2H) -> BatchNorm -> ReLU -> Dropout -> Linear(2H,H) -> Dropout -> Linear(H,1);
  p = sigmoid(that) = "the SLM's token is fine", LLM when p < τ.
features="hidden+head" (the default for new routers): the same MLP over [h, s], where s
  are the head's signals (logit of the SLM's top probability, top-1 minus top-2 logit,
  entropy; citer.kernels.routed_head.head_signals_ref), in a residual form
  p = sigmoid(c . s + MLP([h, s])) with c = (1, 0, 0) and the MLP's last layer at zero
  to start: an untrained router *is* the confidence rule (p = the top probability), and
  training can only add to it.

For inference the BatchNorm folds into the first Linear and the last two Linears fold
into one (nothing nonlinear between them), so the deployed router is
sigmoid(relu(h @ W1.T + s @ Ws.T + b1) @ w2 + b2 + s @ c): a RouterParams the routed
head eats (w_sig = c_sig = None for a hidden-only router).

A saved router is a folder: router.safetensors + router_config.json ("features" names the
input; folders without it are hidden-only).
"""
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from citer.kernels.routed_head import NUM_SIGNALS, RouterParams, router_mlp_ref

CONFIG_NAME = "router_config.json"
WEIGHTS_NAME = "router.safetensors"
ARCHITECTURE = "citer-router-mlp"
LINEAR_ARCHITECTURE = "citer-router-linear"  # p = sigmoid(w . h + b): the Co-LLM-style deferral head
FEATURES = ("hidden", "hidden+head")


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

    @torch.no_grad()
    def fold(self) -> RouterParams:
        """-> RouterParams (W1 [2H, H], b1 [2H], w2 [2H], b2 [], and for hidden+head
        W_sig [2H, NUM_SIGNALS], c [NUM_SIGNALS]) with BatchNorm and the last two Linears folded."""
        lin1, bn, _, _, lin2, _, lin3 = self.net
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        w1 = lin1.weight * s[:, None]
        b1 = (lin1.bias - bn.running_mean) * s + bn.bias
        w2 = (lin3.weight @ lin2.weight).squeeze(0)
        b2 = (lin3.weight @ lin2.bias + lin3.bias).squeeze(0)
        f = lambda t: t.float().contiguous()  # noqa: E731
        if not self.head_signals:
            return RouterParams(f(w1), f(b1), f(w2), f(b2))
        h = self.hidden_size
        return RouterParams(f(w1[:, :h]), f(b1), f(w2), f(b2 + self.skip.bias[0]), f(w1[:, h:]),
                            f(self.skip.weight[0]))


@dataclass
class FoldedRouter:
    params: RouterParams
    hidden_size: int
    default_threshold: float = 0.5
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def head_signals(self) -> bool:
        return self.params.head_signals

    @property
    def features(self) -> str:
        return "hidden+head" if self.head_signals else "hidden"

    def to(self, device, dtype=torch.float32) -> "FoldedRouter":
        moved = RouterParams(*(t.to(device=device, dtype=dtype) if t is not None else None for t in self.params))
        if torch.device(device).type == "cpu":
            # W1 as a view of a contiguous [H, R] copy: the GEMV inside router_mlp_ref then
            # streams W1 row-major, about twice as fast on CPU as the [R, H] layout
            moved = moved._replace(w1=moved.w1.t().contiguous().t())
        return FoldedRouter(moved, self.hidden_size, self.default_threshold, self.meta)

    def score(self, h_normed: torch.Tensor, signals: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, H] (+ [B, NUM_SIGNALS] head signals for a hidden+head router) -> [B]."""
        return router_mlp_ref(h_normed, self.params, signals)


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

    @torch.no_grad()
    def fold(self) -> RouterParams:
        w, b = self.linear.weight[0].float(), self.linear.bias.float()
        return RouterParams(torch.stack([w, -w]).contiguous(), torch.cat([b, -b]), torch.tensor([1.0, -1.0]),
                            torch.tensor(0.0))


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
    cfg_path, w_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"router folder not found: {path!r}")
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"router folder {path!r} has no {os.path.basename(p)}")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    if config.get("architecture") not in (ARCHITECTURE, LINEAR_ARCHITECTURE):
        raise ValueError(f"unsupported router architecture {config.get('architecture')!r} in {path!r}; "
                         f"citer supports {ARCHITECTURE!r} and {LINEAR_ARCHITECTURE!r}")
    if not isinstance(config.get("hidden_size"), int) or config["hidden_size"] < 1:
        raise ValueError(f"{cfg_path} has no positive int 'hidden_size'")
    features = config.get("features", "hidden")
    if features not in FEATURES or (config["architecture"] == LINEAR_ARCHITECTURE and features != "hidden"):
        raise ValueError(f"{cfg_path} has unsupported router features {features!r}; citer supports {FEATURES}")
    router = (LinearRouter(config["hidden_size"]) if config["architecture"] == LINEAR_ARCHITECTURE
              else RouterMLP(config["hidden_size"], features=features))
    try:
        state = load_file(w_path)
    except Exception as e:
        raise ValueError(f"cannot read router weights {w_path!r} (not a valid safetensors file?): {e}") from e
    try:
        router.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"router weights {w_path!r} do not fit its config (hidden_size "
                         f"{config['hidden_size']}, features {features!r}): {e}") from e
    return router.eval(), config


def load_router(path: str, slm_hidden_size: Optional[int] = None) -> FoldedRouter:
    router, config = load_router_mlp(path)
    if slm_hidden_size is not None and router.hidden_size != slm_hidden_size:
        raise ValueError(
            f"router in {path!r} expects hidden size {router.hidden_size}, "
            f"but the SLM's hidden size is {slm_hidden_size}"
        )
    return FoldedRouter(router.fold(), router.hidden_size, float(config.get("default_threshold", 0.5)),
                        config.get("meta", {}))
