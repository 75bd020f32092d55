"""The vault on its AWS backends: S3 on a real S3-compatible server (s3proxy) and KMS on
moto's server. Crypto-shredding on each: a ciphertext copied before the purge cannot be
decrypted after it, and the wrapped data key is gone (moto ignores KMS key state, so the
key's destruction, not the KMS key, is what must be checked)."""

from __future__ import annotations

import base64
import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from schemas.events import ProbeSubmitted, PurgeReason
from services.vault import (
    FileObjectStore,
    KeyWrapper,
    KmsKek,
    LocalKek,
    ObjectPurged,
    ObjectStore,
    S3ObjectStore,
    SqliteVaultIndex,
    UnknownObject,
    Vault,
    VaultError,
    binding,
    open_db,
)
from tests import intake_samples as s
from tests.conftest import ServiceProcess
from tests.integration.aws_servers import (  # noqa: F401 - fixtures
    AwsEndpoint,
    aws_env,
    kms_server,
    new_bucket,
    new_kms_key,
    s3_server,
)
from tests.integration.intake_support import (
    files_under,
    make_request,
    new_id,
    outcomes,
    publish,
    start_intake,
)
from tests.integration.test_intake_purge import case, purged_events

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def store_for(kind: str, s3: AwsEndpoint, tmp: Path) -> ObjectStore:
    if kind == "s3":
        return S3ObjectStore(s3.client("s3"), new_bucket(s3, f"v-{uuid.uuid4().hex[:12]}"),
                             "probes/")
    return FileObjectStore(tmp / "objects")


def keys_for(kind: str, kms: AwsEndpoint, tmp: Path) -> KeyWrapper:
    if kind == "kms":
        return KmsKek(kms.client("kms"), new_kms_key(kms))
    return LocalKek(tmp / "kek")


@pytest.mark.parametrize(("store_kind", "key_kind"),
                         [("s3", "kms"), ("s3", "local"), ("filesystem", "kms")])
def test_crypto_shredding_on_each_backend(
    store_kind: str, key_kind: str, s3_server: AwsEndpoint,  # noqa: F811
    kms_server: AwsEndpoint, tmp_path: Path,  # noqa: F811
) -> None:
    store = store_for(store_kind, s3_server, tmp_path)
    keys = keys_for(key_kind, kms_server, tmp_path)
    vault = Vault(SqliteVaultIndex(open_db(tmp_path / "intake.db")), store, keys)
    image = s.face_jpeg()
    ref = vault.put(probe_id="prb-shred", case_id="CASE-S", data=image, created_at=T0,
                    expires_at=T0 + timedelta(hours=1))
    assert vault.get(ref) == image
    copy = vault.read_ciphertext(ref)  # a backup or replica taken before the purge
    assert image[1000:1064] not in copy
    _kek, wrapped = vault.index.wrapped_key(ref)
    assert wrapped is not None
    if key_kind == "kms":
        # KMS enforces the encryption context: the wrapped key is bound to probe and case.
        with pytest.raises(VaultError):
            keys.unwrap(wrapped, binding("prb-shred", "CASE-OTHER", "probe"))

    entry = vault.purge(ref, "expired", T0 + timedelta(hours=2))
    assert entry.state == "purged"
    with pytest.raises(UnknownObject):  # the ciphertext is gone from the store
        store.get(entry.object_name)
    with pytest.raises(ObjectPurged):  # and the copy no longer opens
        vault.open_blob(ref, copy)
    assert vault.index.wrapped_key(ref)[1] is None
    db_bytes = b"".join(p.read_bytes() for p in files_under(tmp_path))
    assert wrapped not in db_bytes and base64.b64encode(wrapped) not in db_bytes


async def test_intake_service_on_s3_and_kms_purges_a_closed_case(
    kafka_bootstrap: str, services: dict[str, ServiceProcess], service_env: dict[str, str],
    s3_server: AwsEndpoint, kms_server: AwsEndpoint,  # noqa: F811
) -> None:
    bucket = new_bucket(s3_server, f"vault-{uuid.uuid4().hex[:12]}")
    key_id = new_kms_key(kms_server)
    case_id = new_id("CASE-S3")
    await publish(kafka_bootstrap, [case(case_id, "open")])
    intake = start_intake(
        services, **aws_env(), FRS_VAULT_BACKEND="s3", FRS_VAULT_S3_BUCKET=bucket,
        FRS_VAULT_S3_ENDPOINT_URL=s3_server.url, FRS_VAULT_S3_PREFIX="probes/",
        FRS_VAULT_KEK_BACKEND="kms", FRS_VAULT_KMS_KEY_ID=key_id,
        FRS_VAULT_KMS_ENDPOINT_URL=kms_server.url, FRS_INTAKE_PURGE_INTERVAL_S="1")
    image = s.face_jpeg()
    req = make_request(service_env, image, case_id=case_id)
    await publish(kafka_bootstrap, [req])
    [env] = (await outcomes(kafka_bootstrap, [req.request_id]))[req.request_id]
    event = env.event
    assert isinstance(event, ProbeSubmitted)

    s3 = s3_server.client("s3")
    key = f"probes/probe/{event.probe_id}"
    copy = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert image[1000:1064] not in copy
    state = Path(service_env["FRS_STATE_DIR"])
    # Only the index is local: no object files, no local key file with the KMS backend.
    assert files_under(state / "vault" / "objects") == []
    assert not (state / "keys" / "vault.kek").exists()
    index = SqliteVaultIndex(open_db(state / "vault" / "intake.db"))
    kek_id, wrapped = index.wrapped_key(event.vault_ref)
    assert kek_id == f"kms:{key_id}" and wrapped is not None
    # Before the purge the copy opens with the indexed key through KMS.
    kms_keys = KmsKek(kms_server.client("kms"), key_id)
    reader = Vault(index, S3ObjectStore(s3, bucket, "probes/"), kms_keys)
    assert hashlib.sha256(reader.open_blob(event.vault_ref, copy)).hexdigest() == \
        event.sanitized_sha256

    await publish(kafka_bootstrap, [case(case_id, "closed")])
    [purged] = await purged_events(kafka_bootstrap, {event.probe_id})
    assert purged.reason == PurgeReason.CASE_CLOSED
    with pytest.raises(ClientError):
        s3.get_object(Bucket=bucket, Key=key)
    with pytest.raises(ObjectPurged):
        reader.open_blob(event.vault_ref, copy)
    assert index.wrapped_key(event.vault_ref)[1] is None
    assert wrapped not in b"".join(p.read_bytes() for p in files_under(state / "vault"))
    intake.stop()


def test_an_unversioned_bucket_passes_the_start_check(
        s3_server: AwsEndpoint) -> None:  # noqa: F811
    # s3proxy cannot enable versioning (NotImplemented); the refusal of a versioned
    # bucket is a unit test. Here: the real call, on a real server, lets a plain bucket by.
    client = s3_server.client("s3")
    S3ObjectStore(client, new_bucket(s3_server, f"v-{uuid.uuid4().hex[:12]}")
                  ).refuse_versioned_bucket()
