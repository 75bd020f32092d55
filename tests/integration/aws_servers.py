"""Session fixtures for the vault's AWS backends: a real S3-compatible server (s3proxy,
started by deploy/s3proxy/s3proxy.sh) and moto's KMS server, both on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest

from tests.conftest import ROOT
from tests.helpers import free_port

S3PROXY = ROOT / "deploy" / "s3proxy" / "s3proxy.sh"
ACCESS_KEY = "frs-local"
SECRET_KEY = "frs-local-secret"
REGION = "us-east-1"


@dataclass(frozen=True)
class AwsEndpoint:
    url: str

    def client(self, service: str) -> Any:
        return boto3.client(service, endpoint_url=self.url, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AwsEndpoint]:
    port = free_port()
    env = {**os.environ, "FRS_S3PROXY_PORT": str(port),
           "FRS_S3PROXY_STATE": str(tmp_path_factory.mktemp("s3proxy")),
           "FRS_S3PROXY_IDENTITY": ACCESS_KEY, "FRS_S3PROXY_CREDENTIAL": SECRET_KEY}
    subprocess.run([str(S3PROXY), "start"], env=env, check=True, timeout=600)
    try:
        yield AwsEndpoint(f"http://127.0.0.1:{port}")
    finally:
        subprocess.run([str(S3PROXY), "stop"], env=env, check=False, timeout=60)


@pytest.fixture(scope="session")
def kms_server() -> Iterator[AwsEndpoint]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield AwsEndpoint(f"http://127.0.0.1:{port}")
    finally:
        server.stop()


def new_bucket(s3: AwsEndpoint, name: str) -> str:
    s3.client("s3").create_bucket(Bucket=name)
    return name


def new_kms_key(kms: AwsEndpoint) -> str:
    return str(kms.client("kms").create_key(Description="frs vault KEK (test)")
               ["KeyMetadata"]["KeyId"])


def aws_env() -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION}
