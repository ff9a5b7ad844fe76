"""ServerArgs: every setting of `citer serve` beyond the engine's (EngineArgs), in one
dataclass, checked once. `citer serve`'s flags are made from these fields
(`ServerArgs.add_cli_args`); `create_app(engine, name, ServerArgs(...))` takes one.

Importing this module needs no FastAPI (the CLI builds its parser from it before it
knows whether the serve extra is installed).
"""
import argparse
import dataclasses
import ipaddress
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

from citer.engine.args import cli_type

API_KEY_ENV = "CITER_API_KEY"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _env_key() -> Optional[str]:
    return os.environ.get(API_KEY_ENV) or None


def _help(text: str, kind=None) -> dict:
    return {"help": text, "kind": kind}


@dataclass
class ServerArgs:
    host: str = field(default="127.0.0.1", metadata=_help("bind address (default: localhost only)"))
    port: int = field(default=8000, metadata=_help("TCP port"))
    model_name: Optional[str] = field(default=None, metadata=_help(
        "the model id clients ask for (default: citer-demo, or the LLM's folder name)"))
    # ---- who may call ----------------------------------------------------------------
    api_key: Optional[str] = field(default_factory=_env_key, metadata=_help(
        f"require 'Authorization: Bearer <key>' on every route but /health and /metrics (default: "
        f"${API_KEY_ENV}; none: no key)"))
    auth_all_routes: bool = field(default=False, metadata=_help("with --api-key: /health and /metrics need the "
                                                               "key too"))
    allowed_hosts: Optional[Tuple[str, ...]] = field(default=None, metadata=_help(
        "comma-separated Host names accepted ('*' any, '*.example.com' a domain's; default: localhost, "
        "127.0.0.1, ::1 when bound to loopback, else any)", "list"))
    allowed_origins: Optional[Tuple[str, ...]] = field(default=None, metadata=_help(
        "comma-separated browser Origins accepted, e.g. https://ui.example.com or http://localhost:* ('*' any; "
        "default: loopback origins when bound to loopback, else none); requests without Origin are not "
        "affected, and no CORS headers are sent", "list"))
    enable_docs: bool = field(default=False, metadata=_help("serve /docs, /redoc and /openapi.json"))
    # ---- what one request may ask for (each refused before any heavy work) -------------
    max_body_bytes: int = field(default=1 << 20, metadata=_help(
        "largest request body in bytes (413 beyond; parsing it holds the GIL, so keep it modest)"))
    max_prompt_chars: Optional[int] = field(default=None, metadata=_help(
        "most characters in one text prompt, or in a chat's message contents together, checked before "
        "tokenizing (default: 16 x max_model_len)"))
    max_prompts: int = field(default=64, metadata=_help("most prompts in one completions request"))
    max_n: int = field(default=16, metadata=_help("largest n (samples per prompt)"))
    # ---- slow and idle clients -------------------------------------------------------
    header_timeout: float = field(default=10.0, metadata=_help(
        "seconds a client has to send a request's headers (from the connection, or the previous response)"))
    body_timeout: float = field(default=30.0, metadata=_help(
        "seconds a client has to send a request's body once its headers are in (408 beyond)"))
    timeout_keep_alive: float = field(default=5.0, metadata=_help("seconds an idle keep-alive connection stays "
                                                                 "open"))
    max_header_bytes: int = field(default=16384, metadata=_help("largest request head (request line + headers) "
                                                               "in bytes"))
    max_connections: Optional[int] = field(default=None, metadata=_help(
        "connections served at once (503 beyond; default: no limit)"))
    tokenizer_threads: int = field(default=2, metadata=_help("threads that tokenize prompts (off the engine's "
                                                            "thread)"))

    def __post_init__(self):
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"host must be a non-empty string, got {self.host!r}")
        for name in ("model_name", "api_key"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"{name} must be a non-empty string or None")
        for name in ("allowed_hosts", "allowed_origins"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = _split(v)
            if v is not None:
                v = tuple(v)
                if any(not isinstance(s, str) or not s for s in v):
                    raise ValueError(f"{name} must be non-empty strings, got {v!r}")
                setattr(self, name, tuple(s.strip().lower() for s in v))
        ints = {"port": (0, 65535), "max_body_bytes": (1, None), "max_prompts": (1, None), "max_n": (1, 128),
                "max_header_bytes": (256, None), "tokenizer_threads": (1, 64)}
        for name in ("max_prompt_chars", "max_connections"):
            if getattr(self, name) is not None:
                ints[name] = (1, None)
        for name, (lo, hi) in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                raise ValueError(f"{name} must be an int in [{lo}, {hi if hi is not None else 'inf'}], got {v!r}")
        for name in ("header_timeout", "body_timeout", "timeout_keep_alive"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive number of seconds, got {v!r}")
        for name in ("auth_all_routes", "enable_docs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False")

    @property
    def loopback(self) -> bool:
        """Bound to this machine only."""
        return is_loopback(self.host)

    def prompt_chars(self, max_model_len: int) -> int:
        return self.max_prompt_chars if self.max_prompt_chars is not None else 16 * max_model_len

    def hosts(self) -> Tuple[str, ...]:
        """The Host names accepted, resolved."""
        if self.allowed_hosts is not None:
            return self.allowed_hosts
        return LOOPBACK_NAMES if self.loopback else ("*",)

    def origins(self) -> Tuple[str, ...]:
        """The browser origins accepted, resolved."""
        if self.allowed_origins is not None:
            return self.allowed_origins
        if not self.loopback:
            return ()
        return tuple(f"{scheme}://{h}:*" for scheme in ("http", "https") for h in ("localhost", "127.0.0.1", "[::1]"))

    # ---- the command line ------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """One --flag per field (--max-body-bytes for max_body_bytes), with its help."""
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind = f.metadata["kind"] or cli_type(f)
            text = f.metadata["help"]
            if "default" not in text and f.default not in (dataclasses.MISSING, None, False):
                text += f" (default: {f.default})"
            if kind is bool:
                parser.add_argument(flag, action="store_true", help=text)
            elif kind == "list":
                parser.add_argument(flag, type=_split, default=None, help=text)
            else:
                default = f.default if f.default is not dataclasses.MISSING else None
                parser.add_argument(flag, type=kind, default=default, help=text)

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> "ServerArgs":
        values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}
        if values["api_key"] is None:
            values.pop("api_key")  # the environment's, if any
        return cls(**values)


def is_loopback(host: str) -> bool:
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _split(text: str) -> Tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())
