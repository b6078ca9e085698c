"""`nemo3 serve REPO [--port 8001]`: a KServe v2 gRPC development server for a generated repository (not Triton)."""

from __future__ import annotations

import click

from .common import one_line_errors


@click.command("serve")
@click.argument("repository", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", type=int, default=8001, show_default=True, help="gRPC port (0: a free one).")
@one_line_errors
def command(repository, host, port):
    """Serve REPOSITORY's nemo3 models over KServe v2 gRPC where Triton is not installed (development only: this
    is not Triton Inference Server; deploy with Triton as the repository's README.md says)."""
    from ..triton_repo.dev_server import SERVER_NAME, DevServer

    server = DevServer(repository, host=host, port=port).start()
    click.echo(f"{SERVER_NAME}: {', '.join(sorted(server.models))} at {server.url} (Ctrl-C stops)", err=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
