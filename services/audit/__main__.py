"""python -m services.audit: run until SIGTERM, then drain and commit."""

from services.audit.app import build
from services.audit.settings import AuditSettings
from services.kit.runtime import main

if __name__ == "__main__":
    main(build(AuditSettings()))
