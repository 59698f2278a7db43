"""``heatlens serve``: the web app, on this machine's loopback unless told otherwise."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import click

from heatlens.cli.common import ModelSpec, model_options, reported


@click.command("serve")
@model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The default serves this machine only; 0.0.0.0 "
                   "serves anyone who can reach it (there is no login).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port (0: any free port).")
@click.option("--runs", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="A data-set run (heatlens explain-dir --out) or a folder of them, to browse.")
@click.option("--max-upload-mb", type=click.FloatRange(min=0.001), default=20.0,
              show_default=True, help="Largest upload, in MiB.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=40_000_000,
              show_default=True, help="Largest upload, in pixels (checked before decoding).")
def serve(spec: ModelSpec, host: str, port: int, runs: Path | None, max_upload_mb: float,
          max_pixels: int) -> None:
    """Compare explanations in the browser: upload an image, pick a class and methods, see the
    maps side by side with their faithfulness; browse data-set runs with --runs.

    The model loads once, at start-up; open the address printed. Needs the app extra:
    pip install 'heatlens[app]'."""
    with reported():
        listening = _listening(host, port)  # a port in use is named before anything loads
        from heatlens.metrics.evaluate import needs_extra

        needs_extra("fastapi", "heatlens serve", "app")
        needs_extra("uvicorn", "heatlens serve", "app")
        from heatlens.app.runs import RunShelf

        shelf = None if runs is None else RunShelf(runs)
        loaded = spec.load()
    import uvicorn

    from heatlens.app.server import LOOPBACK_NAMES, create_app
    from heatlens.app.workbench import Workbench

    workbench = Workbench(loaded, max_bytes=int(max_upload_mb * (1 << 20)),
                          max_pixels=max_pixels)
    with reported():
        seconds = workbench.start()
    click.echo(f"model: {loaded.name} (warmed up in {seconds:.1f} s)")
    address, bound = listening.getsockname()[:2]
    loopback = ipaddress.ip_address(address).is_loopback
    app = create_app(workbench, shelf, hosts=LOOPBACK_NAMES if loopback else None)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    shown = f"[{address}]" if ":" in address else address
    click.echo(f"heatlens is serving {loaded.name} on http://{shown}:{bound}/ (Ctrl-C stops)")
    try:
        server.run(sockets=[listening])
    finally:
        workbench.jobs.close()
        listening.close()


def _listening(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` and listening: a client that connects before the server
    loop runs waits instead of being refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listening = socket.socket(family)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((host, port))
    except OSError as exc:
        listening.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port "
                      "(0: any free port)") from exc
    listening.listen(2048)
    return listening
