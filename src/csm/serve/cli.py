"""`csm serve`: the OpenAI-compatible speech server."""

from __future__ import annotations

import argparse
import os
import sys


def _serve(args: argparse.Namespace) -> int:
    import torch

    from ..cli import _load_codec
    from ..generate import load_generator
    from .server import make_server
    from .service import load_voices

    if args.model is None:
        from ..assets import default_model

        args.model = default_model()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen = load_generator(args.model, device=device, codec=_load_codec(args, device), quantize=args.quantize,
                         engine=args.engine)
    if gen.codec is None:
        raise ValueError(f"no audio codec found with {args.model}: pass --codec")
    voices = load_voices(args.voices, gen) if args.voices else None
    try:
        server = make_server(gen, args.host, args.port, slots=args.slots, max_waiting=args.max_waiting,
                             voices=voices, model_name=args.name, chunk_frames=args.chunk_frames,
                             api_key=args.api_key or os.environ.get("CSM_API_KEY"))
    except OSError as e:
        raise ValueError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})") from None
    host, port = server.server_address[:2]
    print(f"csm serve: {args.model} on http://{host}:{port}/ (playground; API at /v1/audio/speech, docs at "
          f"/docs; {args.slots} slots, {len(server.service.voices)} voices); Ctrl-C stops", file=sys.stderr)
    try:
        server.serve_forever()  # uvicorn: Ctrl-C or SIGTERM shut down gracefully
    finally:
        server.server_close()
        server.service.batcher.close()
    return 0


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve OpenAI's /v1/audio/speech API over HTTP (streaming, context)")
    p.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the embedded voice)")
    p.add_argument("--codec", default=None, help="Mimi weights (directory/hub id); default: from --model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=8, help="requests generated together (continuous batching)")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="requests that may wait for a slot (default: 2 x slots); more get 429 + "
                        "Retry-After")
    p.add_argument("--voices", default=None, metavar="JSON",
                   help='named voices: {"name": {"speaker": 0, "text": "...", "audio": "prompt.wav"}}')
    p.add_argument("--name", default="csm", help="the model id /v1/models lists")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $CSM_API_KEY; unset: no key needed)")
    p.add_argument("--chunk-frames", type=int, default=4, help="frames per streamed audio chunk (80 ms each)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    p.add_argument("--quantize", choices=["int8"], default=None, help="int8 weight-only linears")
    p.add_argument("--engine", choices=["eager", "graph", "compile"], default=None,
                   help="frame step: eager (CPU default), graph (CUDA graph, GPU default), compile")
    p.set_defaults(func=_serve)
