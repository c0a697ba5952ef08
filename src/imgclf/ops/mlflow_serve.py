"""`python -m imgclf.ops.mlflow_serve --host H --port P [--auth]`: the MLflow tracking server `imgclf ui` starts,
configured by the environment `servers.mlflow_server_command` builds (see `serve_tracking_app` for why it is
not `mlflow server`)."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="imgclf.ops.mlflow_serve")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--auth", action="store_true")
    args = parser.parse_args(argv)
    from ..tracking.mlflow_internals import serve_tracking_app
    from .servers import sync_admin_password

    if args.auth and sync_admin_password(dict(os.environ)):
        print("MLflow admin: password changed to MLFLOW_AUTH_ADMIN_PASSWORD (the old one no longer works)",
              file=sys.stderr, flush=True)
    serve_tracking_app(args.host, args.port, args.auth)


if __name__ == "__main__":
    main()
