"""Entry point: parse the server's options and run the app under uvicorn (one process per data directory)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from server.config import Settings, add_arguments, settings_from_args

__all__ = ["serve", "main"]


def serve(settings: Settings) -> None:
    """Run the service in the foreground until SIGINT/SIGTERM."""
    import uvicorn

    from server.app import create_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    # One worker: the collections live in this process's memory and the data directory is locked.
    uvicorn.run(app, host=settings.host, port=settings.port, workers=1, log_level=settings.log_level,
                access_log=False, timeout_graceful_shutdown=10)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server", description="tqindex REST service")
    add_arguments(p)
    ns = p.parse_args(argv)
    try:
        settings = settings_from_args(ns)
    except ValueError as e:
        p.error(str(e))
    serve(settings)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
