"""python -m services.intake: run until SIGTERM, then drain and commit."""

from services.intake.app import build
from services.intake.settings import IntakeSettings
from services.kit.runtime import main

if __name__ == "__main__":
    main(build(IntakeSettings()))
