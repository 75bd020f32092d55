"""The vault: encrypted image storage shared by reference (REQ-ENCRYPT, REQ-TTL). Intake
puts and purges, dispatch gets; each opens it with ``open_vault(VaultSettings(), index)``
over the index ``open_index`` picks from FRS_STATE_URL. It imports no service."""

from __future__ import annotations

from pathlib import Path

from services.kit.state import StateUrl, read_password
from services.vault.core import (
    FileObjectStore,
    KeyWrapper,
    KmsKek,
    LocalKek,
    ObjectKind,
    ObjectPurged,
    ObjectStore,
    S3ObjectStore,
    SqliteVaultIndex,
    UnknownObject,
    Vault,
    VaultEntry,
    VaultError,
    VaultIndex,
    binding,
    open_db,
    probe_ref,
)
from services.vault.epochs import EpochKek
from services.vault.pg_index import PgVaultIndex
from services.vault.settings import VaultSettings

__all__ = ["EpochKek", "FileObjectStore", "KeyWrapper", "KmsKek", "LocalKek", "ObjectKind",
           "ObjectPurged", "ObjectStore", "PgVaultIndex", "S3ObjectStore", "SqliteVaultIndex",
           "UnknownObject", "Vault", "VaultEntry", "VaultError", "VaultIndex", "VaultSettings",
           "binding", "open_db", "open_index", "open_vault", "probe_ref"]


def key_wrapper(settings: VaultSettings) -> KeyWrapper:
    if settings.kek_backend == "kms":
        import boto3

        assert settings.kms_key_id is not None
        kms = boto3.client("kms", endpoint_url=settings.kms_endpoint_url,
                           region_name=settings.aws_region)
        return KmsKek(kms, settings.kms_key_id)
    if settings.kek_backend == "local":
        return LocalKek(settings.kek_path)
    return EpochKek(settings.kek_epochs_dir, epoch_hours=settings.kek_epoch_hours,
                    grace=settings.kek_epoch_grace, legacy=settings.kek_path)


def object_store(settings: VaultSettings) -> ObjectStore:
    if settings.backend == "s3":
        import boto3

        s3 = boto3.client("s3", endpoint_url=settings.s3_endpoint_url,
                          region_name=settings.aws_region)
        store = S3ObjectStore(s3, settings.s3_bucket, settings.s3_prefix)
        store.refuse_versioned_bucket()
        return store
    return FileObjectStore(settings.root / "objects")


def open_index(settings: VaultSettings, state: StateUrl, password_file: Path | None = None,
               *, name: str, max_size: int = 4) -> VaultIndex:
    """The index FRS_STATE_URL names: the shared database (as the service's role; no
    SQLite file is made), or the SQLite file under the vault dir. The caller closes it."""
    if state.postgres:
        return PgVaultIndex.connect(state.conninfo, read_password(password_file),
                                    name=name, max_size=max_size)
    return SqliteVaultIndex(open_db(settings.index_path))


def open_vault(settings: VaultSettings, index: VaultIndex | None = None) -> Vault:
    """The vault over its index (the SQLite file unless the caller opened one with
    ``open_index``) and its backends."""
    if index is None:
        index = SqliteVaultIndex(open_db(settings.index_path))
    return Vault(index, object_store(settings), key_wrapper(settings))
