"""Where the vault keeps ciphertexts and what wraps its data keys: FRS_VAULT_<NAME>, the
same in every service that opens it (intake writes and purges, dispatch reads). The older
FRS_INTAKE_<NAME> spellings are still read, so existing deployments keep their vault."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.kit.env import shared


def _vault(name: str, old: str, default: Any, description: str) -> Any:
    return Field(default, validation_alias=AliasChoices(f"FRS_VAULT_{name}",
                                                        f"FRS_INTAKE_{old}"),
                 description=description)


class VaultSettings(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    local_mode: bool = shared("FRS_LOCAL_MODE", True, "Allow local-only defaults.")
    state_dir: Path = shared("FRS_STATE_DIR", Path(".state"), "Where local state lives.")
    dir: Path | None = _vault("DIR", "VAULT_DIR", None, "Vault index and filesystem "
                              "objects; default <FRS_STATE_DIR>/vault.")
    backend: Literal["filesystem", "s3"] = _vault("BACKEND", "VAULT_BACKEND", "filesystem",
                                                  "Where ciphertexts live.")
    s3_bucket: str = _vault("S3_BUCKET", "S3_BUCKET", "frs-vault",
                            "S3 bucket for the s3 backend.")
    s3_prefix: str = _vault("S3_PREFIX", "S3_PREFIX", "", "Key prefix inside the bucket.")
    s3_endpoint_url: str | None = _vault("S3_ENDPOINT_URL", "S3_ENDPOINT_URL", None,
                                         "S3-compatible endpoint; None: AWS.")
    kek_backend: Literal["epoch", "local", "kms"] = _vault(
        "KEK_BACKEND", "KEK_BACKEND", "epoch", "What wraps data keys: epoch (local mode: a "
        "key per expiry epoch, destroyed once the epoch is over), local (one key file "
        "forever: a copy of the index taken before a purge stays decryptable), kms.")
    kek_file: Path | None = _vault("KEK_FILE", "KEK_FILE", None, "The single local "
                                   "key-encryption key (0600) of the local backend; the "
                                   "epoch backend reads an older vault's objects with it and "
                                   "destroys it once none is stored; default "
                                   "<FRS_STATE_DIR>/keys/vault.kek.")
    kek_dir: Path | None = Field(None, validation_alias=AliasChoices("FRS_VAULT_KEK_DIR"),
                                 description="Epoch key-encryption keys (0600 files, 0700 "
                                 "directory); keep it out of backups and snapshots; default "
                                 "<FRS_STATE_DIR>/keys/vault-epochs.")
    kek_epoch_hours: float = Field(24.0, gt=0, validation_alias=AliasChoices(
        "FRS_VAULT_KEK_EPOCH_HOURS"), description="Length of a key epoch: a data key is "
        "wrapped under the key of the epoch its object expires in, so a copy of it is noise "
        "at most this (plus the grace) after that expiry.")
    kek_epoch_grace_hours: float = Field(1.0, ge=0, validation_alias=AliasChoices(
        "FRS_VAULT_KEK_EPOCH_GRACE_HOURS"), description="How long after its end an epoch "
        "key is kept (clock skew, puts in flight) before the purger destroys it.")
    kms_key_id: str | None = _vault("KMS_KEY_ID", "KMS_KEY_ID", None,
                                    "KMS key id or ARN for the kms backend.")
    kms_endpoint_url: str | None = _vault("KMS_ENDPOINT_URL", "KMS_ENDPOINT_URL", None,
                                          "KMS endpoint; None: AWS.")
    aws_region: str = _vault("AWS_REGION", "AWS_REGION", "us-east-1",
                             "Region for S3 and KMS clients.")

    @model_validator(mode="after")
    def _secure_outside_local(self) -> VaultSettings:
        if not self.local_mode and self.kek_backend != "kms":
            raise ValueError("FRS_VAULT_KEK_BACKEND=kms is required outside local mode")
        if self.kek_backend == "kms" and not self.kms_key_id:
            raise ValueError("FRS_VAULT_KMS_KEY_ID is required with the kms key backend")
        return self

    @property
    def root(self) -> Path:
        return self.dir or self.state_dir / "vault"

    @property
    def kek_path(self) -> Path:
        return self.kek_file or self.state_dir / "keys" / "vault.kek"

    @property
    def kek_epochs_dir(self) -> Path:
        return self.kek_dir or self.state_dir / "keys" / "vault-epochs"

    @property
    def kek_epoch_grace(self) -> timedelta:
        return timedelta(hours=self.kek_epoch_grace_hours)

    @property
    def index_path(self) -> Path:
        # The intake's name, kept: an existing vault's keys are in this file.
        return self.root / "intake.db"
