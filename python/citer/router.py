"""The CITER router: an MLP over the SLM's final (normed) hidden state.

Training network (CITER): Linear(H,2H) -> BatchNorm -> ReLU -> Dropout -> Linear(2H,H)
-> Dropout -> Linear(H,1) -> sigmoid; p = "the SLM's token is fine", LLM when p < τ.
For inference the BatchNorm folds into the first Linear and the last two Linears fold
into one (nothing nonlinear between them), so the deployed router is
sigmoid(relu(h @ W1.T + b1) @ w2 + b2): a (W1, b1, w2, b2) tuple the routed head eats.

A saved router is a folder: router.safetensors + router_config.json.
"""
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from citer.kernels.routed_head import router_mlp_ref

CONFIG_NAME = "router_config.json"
WEIGHTS_NAME = "router.safetensors"
ARCHITECTURE = "citer-router-mlp"


class RouterMLP(nn.Module):
    def __init__(self, hidden_size: int, dropout: float = 0.1):
        super().__init__()
        h = hidden_size
        self.hidden_size = hidden_size
        self.net = nn.Sequential(
            nn.Linear(h, 2 * h), nn.BatchNorm1d(2 * h), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(2 * h, h), nn.Dropout(dropout), nn.Linear(h, 1),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [B, H] -> logits [B]
        return self.net(h).squeeze(-1)

    @torch.no_grad()
    def fold(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (W1 [2H, H], b1 [2H], w2 [2H], b2 []) with BatchNorm and the last two Linears folded."""
        lin1, bn, _, _, lin2, _, lin3 = self.net
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        w1 = lin1.weight * s[:, None]
        b1 = (lin1.bias - bn.running_mean) * s + bn.bias
        w2 = (lin3.weight @ lin2.weight).squeeze(0)
        b2 = (lin3.weight @ lin2.bias + lin3.bias).squeeze(0)
        return w1.float().contiguous(), b1.float(), w2.float().contiguous(), b2.float()


@dataclass
class FoldedRouter:
    w1: torch.Tensor  # [R, H]
    b1: torch.Tensor  # [R]
    w2: torch.Tensor  # [R]
    b2: torch.Tensor  # []
    hidden_size: int
    default_threshold: float = 0.5
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def params(self):
        return (self.w1, self.b1, self.w2, self.b2)

    def to(self, device, dtype=torch.float32) -> "FoldedRouter":
        moved = [t.to(device=device, dtype=dtype) for t in self.params]
        out = FoldedRouter(*moved, self.hidden_size, self.default_threshold, self.meta)
        if torch.device(device).type == "cpu":
            # W1 as a view of a contiguous [H, R] copy: the GEMV inside router_mlp_ref then
            # streams W1 row-major, about twice as fast on CPU as the [R, H] layout
            out.w1 = out.w1.t().contiguous().t()
        return out

    def score(self, h_normed: torch.Tensor) -> torch.Tensor:  # [B, H] -> [B]
        return router_mlp_ref(h_normed, *self.params)


def save_router(router: RouterMLP, path: str, default_threshold: float = 0.5,
                meta: Optional[Dict[str, Any]] = None) -> None:
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in router.state_dict().items()}
    save_file(state, os.path.join(path, WEIGHTS_NAME))
    config = {
        "architecture": ARCHITECTURE,
        "hidden_size": router.hidden_size,
        "default_threshold": default_threshold,
        "meta": meta or {},
    }
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)


def load_router_mlp(path: str) -> Tuple[RouterMLP, Dict[str, Any]]:
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
    if config.get("architecture") != ARCHITECTURE:
        raise ValueError(f"unsupported router architecture {config.get('architecture')!r} in {path!r}; "
                         f"citer supports {ARCHITECTURE!r}")
    if not isinstance(config.get("hidden_size"), int) or config["hidden_size"] < 1:
        raise ValueError(f"{cfg_path} has no positive int 'hidden_size'")
    router = RouterMLP(config["hidden_size"])
    try:
        state = load_file(w_path)
    except Exception as e:
        raise ValueError(f"cannot read router weights {w_path!r} (not a valid safetensors file?): {e}") from e
    try:
        router.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"router weights {w_path!r} do not fit its config (hidden_size "
                         f"{config['hidden_size']}): {e}") from e
    return router.eval(), config


def load_router(path: str, slm_hidden_size: Optional[int] = None) -> FoldedRouter:
    router, config = load_router_mlp(path)
    if slm_hidden_size is not None and router.hidden_size != slm_hidden_size:
        raise ValueError(
            f"router in {path!r} expects hidden size {router.hidden_size}, "
            f"but the SLM's hidden size is {slm_hidden_size}"
        )
    return FoldedRouter(*router.fold(), router.hidden_size,
                        float(config.get("default_threshold", 0.5)), config.get("meta", {}))
