"""What the workspace relies on from object storage, checked against real S3 servers.

Each test runs against moto's standalone server and against SeaweedFS (``s3_server`` is
parametrised over both; see ``tests/s3_servers.py``), both started by the tests on 127.0.0.1 with
signed requests checked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from pyarrow import fs as pafs

from s3_servers import (  # noqa: F401 - fixtures
    MotoS3Server,
    S3ServerError,
    free_ports,
    moto_s3,
    s3_bucket,
    s3_server,
    seaweed_s3,
)

botocore_exceptions = pytest.importorskip("botocore.exceptions")
ClientError = botocore_exceptions.ClientError


def _write(fs, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def _read(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _keys(server, bucket: str) -> list[str]:
    listing = server.boto3_client().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def _error(e: ClientError) -> tuple[str, int]:
    return e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]


def test_env_reaches_server_through_from_uri_and_boto3(s3_server, s3_bucket, monkeypatch):
    """``server.env()`` alone points FileSystem.from_uri and a bare boto3 client at the server.

    (A bare ``S3FileSystem()`` does not read ``AWS_ENDPOINT_URL``: only ``from_uri`` does.)
    """
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    fs, root = pafs.FileSystem.from_uri(f"s3://{s3_bucket}/ws")
    assert root == f"{s3_bucket}/ws"
    _write(fs, f"{root}/a.txt", b"via env")

    import boto3

    # a new Session: boto3.client() reuses the default session, whose credentials were
    # resolved (and cached) the first time, so it would not see the variables just set
    client = boto3.session.Session().client("s3")
    assert client.meta.endpoint_url == s3_server.endpoint
    assert client.get_object(Bucket=s3_bucket, Key="ws/a.txt")["Body"].read() == b"via env"


def test_env_works_in_a_subprocess(s3_server, s3_bucket):
    """What a Ray worker gets: a fresh process with only ``server.env()`` to go on."""
    code = textwrap.dedent(f"""
        from pyarrow import fs
        f, root = fs.FileSystem.from_uri("s3://{s3_bucket}/ws")
        with f.open_output_stream(root + "/child.txt") as out:
            out.write(b"from child")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3_server.env())
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    assert _read(s3_server.filesystem(), f"{s3_bucket}/ws/child.txt") == b"from child"


def test_pyarrow_write_read_list_and_directories(s3_server, s3_bucket):
    fs, ws = s3_server.filesystem(), f"{s3_bucket}/ws"
    _write(fs, f"{ws}/a/b.txt", b"hello")
    _write(fs, f"{ws}/a/c/d.txt", b"d")
    assert _read(fs, f"{ws}/a/b.txt") == b"hello"

    # a prefix with objects under it is a directory; one with none is not there
    assert fs.get_file_info(ws).type == pafs.FileType.Directory
    assert fs.get_file_info(f"{ws}/a").type == pafs.FileType.Directory
    assert fs.get_file_info(f"{ws}/nope").type == pafs.FileType.NotFound
    listed = {(i.path, i.type) for i in fs.get_file_info(pafs.FileSelector(ws, recursive=True))}
    assert listed == {(f"{ws}/a", pafs.FileType.Directory), (f"{ws}/a/b.txt", pafs.FileType.File),
                      (f"{ws}/a/c", pafs.FileType.Directory),
                      (f"{ws}/a/c/d.txt", pafs.FileType.File)}
    with pytest.raises(FileNotFoundError):
        fs.get_file_info(pafs.FileSelector(f"{ws}/nope"))
    assert fs.get_file_info(pafs.FileSelector(f"{ws}/nope", allow_not_found=True)) == []

    # create_dir writes an empty marker object per level ("x/", "x/y/")
    fs.create_dir(f"{ws}/x/y")
    assert fs.get_file_info(f"{ws}/x/y").type == pafs.FileType.Directory
    # delete_dir_contents removes everything below and leaves (re-creates) the marker "a/"
    fs.delete_dir_contents(f"{ws}/a")
    assert fs.get_file_info(f"{ws}/a").type == pafs.FileType.Directory
    assert _keys(s3_server, s3_bucket) == ["ws/", "ws/a/", "ws/x/", "ws/x/y/"]
    with pytest.raises(FileNotFoundError):
        fs.delete_dir_contents(f"{ws}/nope")
    fs.delete_dir_contents(f"{ws}/nope", missing_dir_ok=True)


def test_move_moves_a_file_but_not_a_directory(s3_server, s3_bucket):
    fs, ws = s3_server.filesystem(), f"{s3_bucket}/ws"
    _write(fs, f"{ws}/src.txt", b"SRC")
    _write(fs, f"{ws}/dst.txt", b"OLD")
    fs.move(f"{ws}/src.txt", f"{ws}/dst.txt")  # copy + delete: replaces dst, not atomic
    assert _read(fs, f"{ws}/dst.txt") == b"SRC"
    assert fs.get_file_info(f"{ws}/src.txt").type == pafs.FileType.NotFound

    _write(fs, f"{ws}/d1/f.txt", b"F")
    with pytest.raises(OSError, match="NO_SUCH_KEY during CopyObject"):
        fs.move(f"{ws}/d1", f"{ws}/d2")


def test_missing_bucket(s3_server):
    fs = s3_server.filesystem()
    with pytest.raises(OSError, match="NO_SUCH_BUCKET"):
        _write(fs, "no-such-bucket-here/ws/f.txt", b"x")
    with pytest.raises(FileNotFoundError):
        _read(fs, "no-such-bucket-here/ws/f.txt")
    assert fs.get_file_info("no-such-bucket-here").type == pafs.FileType.NotFound
    with pytest.raises(OSError, match="allow_bucket_creation"):
        fs.create_dir("no-such-bucket-here/ws")


def test_bad_credentials_are_refused(s3_server, s3_bucket):
    _write(s3_server.filesystem(), f"{s3_bucket}/ws/f.txt", b"x")
    bad_secret = s3_server.filesystem(secret_key="not-the-secret")
    with pytest.raises(OSError, match="SIGNATURE_DOES_NOT_MATCH"):
        bad_secret.get_file_info(pafs.FileSelector(f"{s3_bucket}/ws"))
    with pytest.raises(OSError, match="SIGNATURE_DOES_NOT_MATCH"):
        _write(bad_secret, f"{s3_bucket}/ws/g.txt", b"x")
    with pytest.raises(OSError, match="ACCESS_DENIED"):  # HEAD: no body, so no error code
        _read(bad_secret, f"{s3_bucket}/ws/f.txt")
    with pytest.raises(ClientError) as e:
        s3_server.boto3_client(secret_key="not-the-secret").list_objects_v2(Bucket=s3_bucket)
    assert _error(e.value) == ("SignatureDoesNotMatch", 403)
    with pytest.raises(ClientError) as e:
        s3_server.boto3_client(access_key="AKIANOSUCHKEY0000000").list_objects_v2(
            Bucket=s3_bucket)
    assert _error(e.value) == ("InvalidAccessKeyId", 403)


def test_conditional_create(s3_server, s3_bucket):
    c = s3_server.boto3_client()
    c.put_object(Bucket=s3_bucket, Key="lock", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as e:
        c.put_object(Bucket=s3_bucket, Key="lock", Body=b"second", IfNoneMatch="*")
    assert _error(e.value) == ("PreconditionFailed", 412)
    assert c.get_object(Bucket=s3_bucket, Key="lock")["Body"].read() == b"first"

    # also against an object pyarrow wrote
    _write(s3_server.filesystem(), f"{s3_bucket}/by-pyarrow", b"x")
    with pytest.raises(ClientError) as e:
        c.put_object(Bucket=s3_bucket, Key="by-pyarrow", Body=b"y", IfNoneMatch="*")
    assert _error(e.value) == ("PreconditionFailed", 412)

    # compare-and-swap on the ETag
    etag = c.head_object(Bucket=s3_bucket, Key="lock")["ETag"]
    c.put_object(Bucket=s3_bucket, Key="lock", Body=b"third", IfMatch=etag)
    with pytest.raises(ClientError) as e:
        c.put_object(Bucket=s3_bucket, Key="lock", Body=b"stale", IfMatch=etag)
    assert _error(e.value) == ("PreconditionFailed", 412)


def test_conditional_create_has_one_winner_among_concurrent_writers(s3_server, s3_bucket):
    # 3 writers: SeaweedFS makes a 4th and later concurrent writer of one key wait ~1-2 s
    writers, rounds = 3, 3
    clients = [s3_server.boto3_client() for _ in range(writers)]
    for r in range(rounds):
        key, barrier = f"race/{r}", threading.Barrier(writers)
        wins, losses, other = [], [], []

        def write(i: int) -> None:
            barrier.wait(timeout=10)
            try:
                clients[i].put_object(Bucket=s3_bucket, Key=key, Body=b"w%d" % i,
                                      IfNoneMatch="*")
                wins.append(i)
            except ClientError as e:
                losses.append(_error(e))
            except Exception as e:  # noqa: BLE001
                other.append(e)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not other
        assert len(wins) == 1, (key, wins, losses)
        assert losses == [("PreconditionFailed", 412)] * (writers - 1)
        body = clients[0].get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        assert body == b"w%d" % wins[0]


def test_pyarrow_has_no_conditional_write(s3_server, s3_bucket):
    """Unknown metadata keys are dropped: an If-None-Match "header" overwrites silently."""
    fs, path = s3_server.filesystem(), f"{s3_bucket}/ws/f.txt"
    _write(fs, path, b"first")
    with fs.open_output_stream(path, metadata={"If-None-Match": "*"}) as f:
        f.write(b"second")
    assert _read(fs, path) == b"second"


def test_unreachable_endpoint_fails_fast_with_short_timeouts():
    (port,) = free_ports(1)
    fs = pafs.S3FileSystem(
        endpoint_override=f"http://127.0.0.1:{port}", region="us-east-1", access_key="k",
        secret_key="s", connect_timeout=1, request_timeout=2,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
    t0 = time.monotonic()
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        fs.get_file_info("bucket/key")
    assert time.monotonic() - t0 < 5


def test_failed_start_reports_log_and_cleans_up():
    if MotoS3Server.available():
        pytest.skip(MotoS3Server.available())
    server = MotoS3Server(startup_timeout=0.01)
    with pytest.raises(S3ServerError, match="not ready after") as e:
        server.start()
    assert "log tail" in str(e.value)
    assert server.tmpdir is None and server.pid is None
