"""python -m services.dispatch: run until SIGTERM, then drain and commit."""

from services.dispatch.app import build
from services.dispatch.settings import DispatchSettings
from services.kit.runtime import main

if __name__ == "__main__":
    main(build(DispatchSettings()))
