"""`lorakit serve`: one base model and many adapters behind an OpenAI-compatible HTTP server (lorakit.serve), on
uvicorn. SIGTERM or Ctrl-C stops accepting connections, lets running requests finish, then exits 0."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import values
from .model_args import add_model_arguments, quantize_arg

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def adapter_arg(text: str) -> tuple[str, str]:
    """`NAME=DIR` -> (name, dir); the name's rules are the registry's (lorakit.names)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, found {text!r}")
    return name, path


def _description_arg(text: str) -> tuple[str, str]:
    """`NAME=TEXT` -> (name, text)."""
    name, sep, description = text.partition("=")
    if not sep or not name or not description.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=TEXT, found {text!r}")
    return name, description


def port_arg(text: str) -> int:
    """A TCP port in [0, 65535]; 0 lets the system pick a free one (printed at start)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in [0, 65535], found {text!r}")
    return port


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "serve", help="serve a model and its adapters over OpenAI's HTTP API (as vLLM serves it)",
        description="Serve a base model and many LoRA adapters over OpenAI's API: /v1/models, /v1/completions, "
                    "/v1/chat/completions (stream: true as server-sent events), /v1/load_lora_adapter, "
                    "/v1/unload_lora_adapter, /health, /metrics. \"model\" names the base, an adapter, a mix "
                    "\"a:0.7+b:0.3\" or \"auto\" (the adapter whose description is nearest the prompt).",
    )
    add_model_arguments(parser, what="the base model")
    parser.add_argument("--adapter", action="append", default=[], type=adapter_arg, metavar="NAME=DIR",
                        help="an adapter to register at start; repeat for several (more: POST /v1/load_lora_adapter)")
    parser.add_argument("--describe", action="append", default=[], type=_description_arg, metavar="NAME=TEXT",
                        help="what adapter NAME is for, for \"model\": \"auto\" (routes each request to the adapter "
                             "whose description is nearest the prompt); repeat per adapter")
    parser.add_argument("--max-loras", type=values.positive_int, default=8,
                        help="adapters resident at once; others are loaded on demand, least recently used evicted "
                             "(default: 8)")
    parser.add_argument("--max-lora-rank", type=values.positive_int, default=64,
                        help="the largest adapter rank accepted (default: 64)")
    parser.add_argument("--max-batch", type=values.positive_int, default=64,
                        help="sequences decoded together in one forward; more wait (default: 64)")
    parser.add_argument("--max-n", type=values.positive_int, default=8,
                        help="the largest n (choices per request) accepted (default: 8)")
    parser.add_argument("--served-model-name", default=None, metavar="NAME",
                        help="the base model's name in requests and /v1/models (default: --model's last part)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=port_arg, default=8000, help="TCP port (default: 8000; 0: any free port)")
    parser.add_argument("--api-key", default=os.environ.get("LORAKIT_API_KEY"), metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on every route but /health (default: "
                             "$LORAKIT_API_KEY; unset: no key)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="warning", help="uvicorn's log level (default: warning)")
    parser.set_defaults(func=run)


def base_name(args: argparse.Namespace) -> str:
    """The served name of the base model: --served-model-name, else the last part of --model."""
    return args.served_model_name or Path(str(args.model).rstrip("/")).name


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port (bound here, so a port in use is a one-line error and port 0
    is resolved before the URL is printed).

    Raises:
        OSError: the address cannot be resolved or bound (in use, not this machine's, no permission).
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise OSError(err.errno, err.strerror, f"{host}:{port} (--host / --port)") from err
    return sock


def build(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Load the model, register the --adapter directories (each validated in full), build the engine and the
    app: (engine, registry, app).

    Raises:
        ConfigError: an adapter that cannot be served (the reason named), a model that is not a causal LM.
        ModelDirError / OSError: what loading the model raises.
    """
    from ..hf import load_model_dir, resolve_device
    from ..serve.app import create_app
    from ..serve.engine import Engine
    from ..serve.params import ServeError
    from ..serve.registry import AdapterRegistry
    from ..serve.router import Router

    descriptions = dict(args.describe)
    unknown = sorted(set(descriptions) - {adapter for adapter, _ in args.adapter})
    if unknown:
        raise ConfigError(f"--describe {unknown[0]}=...: no --adapter {unknown[0]}=DIR")
    model, tokenizer = load_model_dir(args.model, task="causal-lm", dtype=args.dtype,
                                      device=resolve_device(args.device), quantize=quantize_arg(args))
    model.eval()
    name = base_name(args)
    registry = AdapterRegistry(model, name, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                               router=Router())
    for adapter, path in args.adapter:
        try:
            registry.register(adapter, path, description=descriptions.get(adapter))
        except ServeError as err:
            raise ConfigError(f"--adapter {adapter}={path}: {err.message}") from err
    engine = Engine(model, tokenizer, registry, max_batch=args.max_batch)
    app = create_app(engine, registry, tokenizer, api_key=args.api_key, max_n=args.max_n, base_name=name)
    return engine, registry, app


def run(args: argparse.Namespace) -> int:
    import asyncio

    import uvicorn

    if args.api_key is not None and not args.api_key:
        raise ConfigError("--api-key must not be empty")
    sock = bind(args.host, args.port)
    try:
        engine, registry, app = build(args)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"lorakit serve: http://{shown}:{port}/v1  (model {base_name(args)!r}, adapters: "
              f"{', '.join(registry.names()) or 'none'})", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, access_log=False, lifespan="off"))
        # uvicorn handles SIGINT / SIGTERM while it serves (stop accepting, finish open responses) and raises the
        # signal again once it returns: these no-op handlers take it then, so the drain below runs and we exit 0
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
        engine.start()
        try:
            asyncio.run(server.serve(sockets=[sock]))
        finally:
            engine.shutdown(drain=True)
            registry.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        sock.close()
    print("lorakit serve: stopped", file=sys.stderr, flush=True)
    return 0
