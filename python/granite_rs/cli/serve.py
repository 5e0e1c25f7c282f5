"""``granite-rs serve``: an OpenAI-compatible HTTP server for the model (``granite_rs.server``)."""

from __future__ import annotations

import argparse
import os
import sys

from .common import FORMATTER, CliError, add_model_options, load_generator

EPILOG = """\
Routes: GET /health, GET /v1/models, POST /v1/chat/completions and /v1/completions (streaming
with server-sent events). Binds 127.0.0.1 unless --host says otherwise.

examples:
  granite-rs serve --port 8000
  granite-rs serve -m ibm-granite/granite-3.3-2b-instruct --host 0.0.0.0 --api-key "$KEY"

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
  client.chat.completions.create(model="granite", messages=[{"role": "user", "content": "Hi"}])
"""


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                              description="An OpenAI-compatible HTTP server (needs granite-rs[serve]).",
                              epilog=EPILOG, formatter_class=FORMATTER)
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (%(default)s)")
    p.add_argument("--port", type=int, default=8000, help="the port (%(default)s; 0 picks a free one)")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("GRANITE_RS_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $GRANITE_RS_API_KEY, else none)")
    p.add_argument("--served-model-name", metavar="NAME", default="granite",
                   help="the model's name in the API (%(default)s)")
    add_model_options(p, suppress=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from granite_rs.server import Server
    except ImportError as e:
        raise CliError(f"serving needs starlette and uvicorn: pip install 'granite-rs[serve]' ({e})") from None
    g, path, _ = load_generator(args)
    server = Server(g, args.served_model_name, api_key=args.api_key)
    config = uvicorn.Config(server.app, host=args.host, port=args.port, log_level="warning")
    web = uvicorn.Server(config)
    if not args.quiet:
        print(f"serving {path.name} as {args.served_model_name!r} on http://{args.host}:{args.port}/v1 "
              "(Ctrl-C stops)", file=sys.stderr, flush=True)
    web.run()
    return 0
