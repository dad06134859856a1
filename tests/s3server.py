"""A loopback S3 server for tests: moto's ThreadedMotoServer on 127.0.0.1, a free port, one bucket.

    from tests.s3server import s3_server   # a session-scoped pytest fixture
    def test_x(s3_server):
        Storage(s3_server.url("prefix"), s3_server.options)

s3fs takes the endpoint via ``client_kwargs``; the region comes from AWS_DEFAULT_REGION (passing
``region_name`` to s3fs breaks bucket creation on moto). Credentials are moto's dummies, set only in this
process's environment for the server's lifetime and restored afterwards.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Iterator

import pytest

FAKE_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3Server:
    endpoint: str
    bucket: str

    @property
    def options(self) -> dict:
        """storage_options for s3fs: the server's own (dummy) credentials, explicit."""
        return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": self.endpoint}}

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def new_bucket(self, *, public_read: bool = False) -> str:
        """Create another bucket (a user's own, say); ``public_read`` lets anonymous clients list and get."""
        import boto3

        name = f"b-{uuid.uuid4().hex[:12]}"
        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        client.create_bucket(Bucket=name)
        if public_read:
            import json

            policy = {"Version": "2012-10-17", "Statement": [{
                "Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{name}", f"arn:aws:s3:::{name}/*"]}]}
            client.put_bucket_policy(Bucket=name, Policy=json.dumps(policy))
        return name

    def put(self, bucket: str, key: str, data: bytes) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").put_object(Bucket=bucket, Key=key, Body=data)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in FAKE_ENV}
    os.environ.update(FAKE_ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3Server(endpoint=f"http://{host}:{port}", bucket="")
    s3.bucket = s3.new_bucket()
    try:
        yield s3
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
