"""python -m services.results: run until SIGTERM, then drain and commit."""

from services.kit.runtime import main
from services.results.app import build
from services.results.settings import ResultsSettings

if __name__ == "__main__":
    main(build(ResultsSettings()))
