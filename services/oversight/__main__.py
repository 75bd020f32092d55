"""python -m services.oversight: run the faust worker until SIGTERM (it commits at stop)."""

import logging

from services.kit.logs import setup_logging
from services.kit.metrics import serve_metrics
from services.oversight.app import build
from services.oversight.settings import OversightSettings


def main() -> None:
    import faust  # only in the worker: `frs oversight report` and the rules need no faust

    settings = OversightSettings()
    setup_logging(settings.service, settings.log_level)
    port = serve_metrics(settings.metrics_host, settings.metrics_port)
    app = build(settings)
    # The same start line as the kit's services: operators and tests find the port here.
    logging.getLogger("frs.oversight").info("service started", extra={"metrics_port": port})
    worker = faust.Worker(app, loglevel=settings.log_level, redirect_stdouts=False)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
