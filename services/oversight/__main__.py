"""python -m services.oversight: run the faust worker until SIGTERM (it commits at stop)."""

from services.kit.logs import setup_logging
from services.kit.metrics import serve_metrics
from services.oversight.app import build
from services.oversight.settings import OversightSettings


def main() -> None:
    import faust

    settings = OversightSettings()
    setup_logging(settings.service, settings.log_level)
    port = serve_metrics(settings.metrics_host, settings.metrics_port)
    app = build(settings)
    import logging

    logging.getLogger("frs.oversight").info("oversight starting", extra={"metrics_port": port})
    worker = faust.Worker(app, loglevel=settings.log_level, redirect_stdouts=False)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
