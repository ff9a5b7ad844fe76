"""The router's inference form: a saved router folder -> the folded weights the routed head eats.

A saved router is a folder: router.safetensors (the training network's state dict, see
citer.research.router_nets) + router_config.json ("architecture", "hidden_size",
"features", "default_threshold", "meta"). Two architectures:

- "citer-router-mlp": CITER's MLP, Linear(n_in, 2H) -> BatchNorm -> ReLU -> Dropout ->
  Linear(2H, H) -> Dropout -> Linear(H, 1), over the SLM's normed hidden state h
  (features "hidden", the paper's input) or over [h, s] with the head's signals s beside
  it (features "hidden+head", plus a skip term c . s).
- "citer-router-linear": p = sigmoid(w . h + b) (the Co-LLM-style deferral head).

At inference BatchNorm folds into the first Linear and the last two Linears fold into
one (nothing nonlinear between them), so every router runs as
    p = sigmoid(relu(h @ W1.T + s @ Ws.T + b1) @ w2 + b2 + s @ c)
(Ws = c = None for a hidden-only router): a RouterParams. `fold_state` does that fold
from the saved tensors alone; the training networks fold through it too, so there is one
fold. The engine reads a router through the `Router` protocol only.
"""
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, NamedTuple, Optional, Protocol, Tuple

import torch
from safetensors.torch import load_file

from citer.kernels.routed_head import NUM_SIGNALS, router_mlp_ref

CONFIG_NAME = "router_config.json"
WEIGHTS_NAME = "router.safetensors"
ARCHITECTURE = "citer-router-mlp"
LINEAR_ARCHITECTURE = "citer-router-linear"  # p = sigmoid(w . h + b): the Co-LLM-style deferral head
FOLDED_ARCHITECTURE = "citer-router-folded"  # the inference form itself (RouterParams' tensors): shipped routers
ARCHITECTURES = (ARCHITECTURE, LINEAR_ARCHITECTURE, FOLDED_ARCHITECTURE)
FEATURES = ("hidden", "hidden+head")
BATCH_NORM_EPS = 1e-5  # torch.nn.BatchNorm1d's default, what the training network uses


class RouterParams(NamedTuple):
    """A folded router, float32 (the tuple the routed-head ops take)."""

    w1: torch.Tensor  # [R, H] first layer, hidden-state part
    b1: torch.Tensor  # [R]
    w2: torch.Tensor  # [R]
    b2: torch.Tensor  # []
    w_sig: Optional[torch.Tensor] = None  # [R, NUM_SIGNALS] first layer, head-signal part (None: hidden-only)
    c_sig: Optional[torch.Tensor] = None  # [NUM_SIGNALS] the signals' direct (skip) weights

    @property
    def head_signals(self) -> bool:
        """Does this router read the head's signals (so it cannot score a row before the lm_head)?"""
        return self.w_sig is not None


class Router(Protocol):
    """What the engine asks of a router."""

    params: RouterParams
    default_threshold: float

    @property
    def head_signals(self) -> bool: ...


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

    def to(self, device, dtype=torch.float32, exact_half_w1: bool = False) -> "FoldedRouter":
        """On device in dtype. exact_half_w1 (the CPU ops' router kernel takes it): a hidden-only
        router's W1 stays float16 where every weight is a float16 value (a router shipped in
        float16): the same scores from half the bytes, the stream that dominates its time."""
        moved = RouterParams(*(t.to(device=device, dtype=dtype).contiguous() if t is not None else None
                               for t in self.params))  # W1 [R, H] row-major: the ops' linear streams it once
        w1 = moved.w1
        if exact_half_w1 and not self.head_signals and torch.equal(w1.half().to(w1.dtype), w1):
            moved = moved._replace(w1=w1.half())
        return FoldedRouter(moved, self.hidden_size, self.default_threshold, self.meta)

    def score(self, h_normed: torch.Tensor, signals: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, H] (+ [B, NUM_SIGNALS] head signals for a hidden+head router) -> [B]."""
        return router_mlp_ref(h_normed, self.params, signals)


@torch.no_grad()
def fold_state(state: Dict[str, torch.Tensor], architecture: str, hidden_size: int) -> RouterParams:
    """A router network's state dict -> its RouterParams (W1 [2H, H], b1 [2H], w2 [2H], b2 [],
    and for a hidden+head router W_sig [2H, NUM_SIGNALS], c [NUM_SIGNALS])."""
    f = lambda t: t.float().contiguous()  # noqa: E731
    if architecture == FOLDED_ARCHITECTURE:
        return RouterParams(*(f(state[k]) if k in state else None for k in RouterParams._fields))
    if architecture == LINEAR_ARCHITECTURE:
        w, b = state["linear.weight"][0].float(), state["linear.bias"].float()
        # relu(z) - relu(-z) = z: W1 = [w; -w], b1 = [b; -b], w2 = [1, -1], b2 = 0 (exact)
        return RouterParams(torch.stack([w, -w]).contiguous(), torch.cat([b, -b]), torch.tensor([1.0, -1.0]),
                            torch.tensor(0.0))
    g = lambda k: state[k].float()  # noqa: E731
    s = g("net.1.weight") / torch.sqrt(g("net.1.running_var") + BATCH_NORM_EPS)
    w1 = g("net.0.weight") * s[:, None]
    b1 = (g("net.0.bias") - g("net.1.running_mean")) * s + g("net.1.bias")
    w2 = (g("net.6.weight") @ g("net.4.weight")).squeeze(0)
    b2 = (g("net.6.weight") @ g("net.4.bias") + g("net.6.bias")).squeeze(0)
    if "skip.weight" not in state:
        return RouterParams(f(w1), f(b1), f(w2), f(b2))
    h = hidden_size
    return RouterParams(f(w1[:, :h]), f(b1), f(w2), f(b2 + g("skip.bias")[0]), f(w1[:, h:]), f(g("skip.weight")[0]))


def read_router_folder(path: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """A router folder -> (its config, its state dict), checked: names the file and the
    field of anything citer cannot use."""
    cfg_path, w_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"router folder not found: {path!r}")
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"router folder {path!r} has no {os.path.basename(p)}")
    try:
        with open(cfg_path) as fh:
            config = json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    if config.get("architecture") not in ARCHITECTURES:
        raise ValueError(f"unsupported router architecture {config.get('architecture')!r} in {path!r}; "
                         f"citer supports {', '.join(map(repr, ARCHITECTURES))}")
    if not isinstance(config.get("hidden_size"), int) or config["hidden_size"] < 1:
        raise ValueError(f"{cfg_path} has no positive int 'hidden_size'")
    features = config.setdefault("features", "hidden")
    if features not in FEATURES or (config["architecture"] == LINEAR_ARCHITECTURE and features != "hidden"):
        raise ValueError(f"{cfg_path} has unsupported router features {features!r}; citer supports {FEATURES}")
    try:
        state = load_file(w_path)
    except Exception as e:
        raise ValueError(f"cannot read router weights {w_path!r} (not a valid safetensors file?): {e}") from e
    expected = expected_shapes(config["architecture"], config["hidden_size"], features)
    got = {k: tuple(v.shape) for k, v in state.items() if k in expected or not k.endswith("num_batches_tracked")}
    if {k: got.get(k) for k in expected} != expected or set(got) - set(expected):
        raise ValueError(f"router weights {w_path!r} do not fit its config (hidden_size {config['hidden_size']}, "
                         f"features {features!r}): expected {expected}, found {got}")
    return config, state


def expected_shapes(architecture: str, hidden_size: int, features: str) -> Dict[str, tuple]:
    """The saved tensors of a router network (name -> shape), BatchNorm's step counter aside."""
    h = hidden_size
    if architecture == LINEAR_ARCHITECTURE:
        return {"linear.weight": (1, h), "linear.bias": (1,)}
    if architecture == FOLDED_ARCHITECTURE:
        out = {"w1": (2 * h, h), "b1": (2 * h,), "w2": (2 * h,), "b2": ()}
        if features == "hidden+head":
            out.update({"w_sig": (2 * h, NUM_SIGNALS), "c_sig": (NUM_SIGNALS,)})
        return out
    n_in = h + (NUM_SIGNALS if features == "hidden+head" else 0)
    out = {"net.0.weight": (2 * h, n_in), "net.0.bias": (2 * h,)}
    out.update({f"net.1.{k}": (2 * h,) for k in ("weight", "bias", "running_mean", "running_var")})
    out.update({"net.4.weight": (h, 2 * h), "net.4.bias": (h,), "net.6.weight": (1, h), "net.6.bias": (1,)})
    if features == "hidden+head":
        out.update({"skip.weight": (1, NUM_SIGNALS), "skip.bias": (1,)})
    return out


def save_folded(router: "FoldedRouter", path: str, dtype: torch.dtype = torch.float32) -> None:
    """A router folder in the folded (inference-only) form, e.g. float16 to ship it small."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {k: t.to(dtype).contiguous() for k, t in router.params._asdict().items() if t is not None}
    save_file(tensors, os.path.join(path, WEIGHTS_NAME))
    config = {"architecture": FOLDED_ARCHITECTURE, "hidden_size": router.hidden_size, "features": router.features,
              "default_threshold": router.default_threshold, "stored_dtype": str(dtype).removeprefix("torch."),
              "meta": router.meta}
    with open(os.path.join(path, CONFIG_NAME), "w") as fh:
        json.dump(config, fh, indent=1)


def load_router(path: str, slm_hidden_size: Optional[int] = None,
                slm_shape: Optional[Dict[str, int]] = None) -> FoldedRouter:
    """A router folder -> the FoldedRouter the engine runs (on the CPU; .to(device) it).
    slm_shape ({"num_layers", "vocab_size"} of the SLM) is checked against the one a shipped
    router records in meta["slm_shape"]: a router only means something over its own SLM."""
    config, state = read_router_folder(path)
    if slm_hidden_size is not None and config["hidden_size"] != slm_hidden_size:
        raise ValueError(
            f"router in {path!r} expects hidden size {config['hidden_size']}, "
            f"but the SLM's hidden size is {slm_hidden_size}"
        )
    recorded = (config.get("meta") or {}).get("slm_shape") or {}
    wrong = {k: (v, slm_shape[k]) for k, v in recorded.items() if slm_shape and k in slm_shape and slm_shape[k] != v}
    if wrong:
        pair = config["meta"].get("slm", "another SLM")
        raise ValueError(f"router in {path!r} was trained over {pair} and does not fit this SLM: "
                         + ", ".join(f"{k} {a} (router) vs {b} (SLM)" for k, (a, b) in wrong.items()))
    params = fold_state(state, config["architecture"], config["hidden_size"])
    return FoldedRouter(params, config["hidden_size"], float(config.get("default_threshold", 0.5)),
                        config.get("meta", {}))
