"""Where the latency database lives: a local directory or an S3-compatible bucket, one interface.

Every writer in Dooly (profiler pods, the merge job) goes through `Store`, so the two guarantees the
database rests on are made once, here:

* Atomic writes: a reader sees a whole object or none. LocalStore writes a hidden temporary file in
  the destination directory, fsyncs it and renames it into place (rename is atomic on POSIX). S3
  makes a PUT (and a completed multipart upload) visible only once the whole body is stored.
* Atomic create (`put_if_absent`): LocalStore hard-links a complete temporary file to the final name
  (link fails if the name exists). S3Store sends a conditional PUT with `If-None-Match: *`, which
  AWS S3, SeaweedFS, MinIO and moto honour (HTTP 412 when the key exists). A server that ignores the
  header cannot give this guarantee; Dooly requires one that honours it.

Transient failures (dropped connections, timeouts, 5xx, throttling) are retried with bounded
exponential backoff; anything else becomes one `DoolyError` line naming the store.
"""

from __future__ import annotations

import abc
import io
import json
import logging
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from dooly import SCHEMA_VERSION
from dooly.errors import DoolyError, TransientError

logger = logging.getLogger(__name__)

# A small JSON document at the store root that says which schema version the store holds, so that a
# Dooly of another version stops with one line instead of quarantining every shard it cannot read.
MARKER_KEY = "dooly-store.json"

# Retries of transient errors: attempt n waits about BACKOFF_BASE_S * 2**n (jittered), capped, until
# the attempts or the total deadline run out; then TransientError (exit 75). The deadline is what
# rides out an outage: five minutes by default, DOOLY_S3_RETRY_DEADLINE_S to change it.
DEFAULT_MAX_ATTEMPTS = 100
BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 20.0
DEFAULT_RETRY_DEADLINE_S = 300.0
RETRY_DEADLINE_ENV = "DOOLY_S3_RETRY_DEADLINE_S"
# The up-front reachability check fails fast by default (a mistyped endpoint should not cost five
# minutes); DOOLY_S3_CONNECT_DEADLINE_S gives it a deadline of its own (fleet pods set it, so a
# store that is down when the pod starts is waited for too).
CHECK_MAX_ATTEMPTS = 2
CONNECT_DEADLINE_ENV = "DOOLY_S3_CONNECT_DEADLINE_S"
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
DEFAULT_REGION = "us-east-1"
ENDPOINT_ENV_VARS = ("DOOLY_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_ENV_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")
# Error codes an S3 server uses for "try again later".
TRANSIENT_S3_CODES = frozenset(
    {
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ConditionalRequestConflict",
        # Short-lived credentials that lapsed mid-run: boto3 refreshes refreshable ones on retry.
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
        "TokenRefreshRequired",
    }
)
HTTP_SERVER_ERROR = 500
HTTP_PRECONDITION_FAILED = 412
HTTP_NOT_FOUND = 404
HTTP_FORBIDDEN = 403
TEMP_PREFIX = ".tmp-"
# Files larger than this go up in parts of this size (S3 allows 5 MiB..5 GiB per part).
MULTIPART_PART_BYTES = 64 * 1024 * 1024

T = TypeVar("T")


class Store(abc.ABC):
    """A flat key space of immutable-ish objects; keys use "/" and never start with it.

    A store opened for writing is created (directory or bucket, then the schema marker) by its first
    write, not when it is opened: a command that fails on its inputs after opening its store then
    leaves nothing behind, locally or on S3.
    """

    uri: str
    # What the first write must do first (make the directory or bucket, stamp the marker); None once
    # done, or when the store already existed.
    _pending_create: Callable[[], None] | None = None
    _creating = False
    # Re-entrant: the deferred creation writes the marker through put_if_absent, which comes back here.
    _create_lock = threading.RLock()

    def ensure_created(self) -> None:
        """Make the store exist now, as its first write would (directory or bucket, then the schema
        marker); run once, other writers wait for it, and a failure leaves it armed for the next."""
        if self._pending_create is None:
            return
        with self._create_lock:
            pending = self._pending_create
            if pending is None or self._creating:
                return
            self._creating = True
            try:
                pending()
                self._pending_create = None
            finally:
                self._creating = False

    def _arm_creation(self, create: Callable[[], None] | None, *, write_marker: bool) -> None:
        """Defer `create` (and the schema marker) to the first write."""

        def materialize() -> None:
            if create is not None:
                create()
            if write_marker:
                payload = json.dumps({"schema_version": SCHEMA_VERSION}, indent=2).encode()
                self.put_if_absent(MARKER_KEY, payload)

        self._pending_create = materialize

    def prepare_create(self) -> Callable[[], None] | None:
        """Check, creating nothing, that the store exists or could be created and written; return
        the action that creates it (None when it exists). The default creates eagerly."""
        self.check(create=True)
        return None

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write (or overwrite) `key` atomically; retried on transient errors."""

    @abc.abstractmethod
    def put_file(self, key: str, path: str | os.PathLike) -> None:
        """Upload a local file to `key` atomically, without reading it all into memory."""

    @abc.abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` atomically; False (and nothing written) if it already exists."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The whole object; FileNotFoundError if there is none."""

    @abc.abstractmethod
    def open_binary(self, key: str) -> BinaryIO:
        """A seekable reader, so Parquet readers fetch only the footer and the columns they need."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether `key` holds an object."""

    @abc.abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """Every key under `prefix`, sorted; temporary files of unfinished writes never show."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; removing a missing key is not an error."""

    @abc.abstractmethod
    def url_for(self, key: str) -> str:
        """A local path or s3:// URL that polars and pyarrow can read."""

    @abc.abstractmethod
    def storage_options(self) -> dict[str, str]:
        """Options for polars scans of `url_for` URLs (endpoint, region, credentials)."""

    @abc.abstractmethod
    def check(self, *, create: bool) -> None:
        """Make sure the store is reachable (and exists, or is created); DoolyError otherwise."""

    def move(self, source: str, destination: str) -> None:
        """Copy then delete: the destination is complete before the source disappears."""
        self.put_bytes(destination, self.get_bytes(source))
        self.delete(source)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def _check_key(key: str) -> str:
    """Keys are relative, "/"-separated, with no empty, "." or ".." part: none escapes the store."""
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"invalid store key {key!r}")
    return key


class LocalStore(Store):
    """A directory on a local or network file system (the default store)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _temp_beside(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(f"{TEMP_PREFIX}{path.name}.{uuid.uuid4().hex}")

    def _open_temp(self, path: Path) -> tuple[Path, BinaryIO]:
        """A new temporary file beside `path`. A delete may prune the (empty) directory between
        the mkdir and the open: then make it again, once."""
        temp = self._temp_beside(path)
        try:
            return temp, open(temp, "xb")
        except FileNotFoundError:
            temp = self._temp_beside(path)
            return temp, open(temp, "xb")

    def _fail(self, action: str, key: str, exc: OSError) -> DoolyError:
        reason = exc.strerror or type(exc).__name__
        return DoolyError(f"store {self.uri}: cannot {action} {key}: {reason}")

    def _write_temp(self, path: Path, data: bytes | None, source: Path | None = None) -> Path:
        temp, handle = self._open_temp(path)
        try:
            with handle:
                if source is not None:
                    with open(source, "rb") as reader:
                        shutil.copyfileobj(reader, handle)
                else:
                    handle.write(data or b"")
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return temp

    def _fsync_dir(self, directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _replace(self, key: str, data: bytes | None, source: Path | None = None) -> None:
        path = self._path(key)
        try:
            temp = self._write_temp(path, data, source)
            try:
                os.replace(temp, path)
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
            self._fsync_dir(path.parent)
        except OSError as exc:
            raise self._fail("write", key, exc) from exc

    def put_bytes(self, key: str, data: bytes) -> None:
        self.ensure_created()
        self._replace(key, bytes(data))

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        self.ensure_created()
        self._replace(key, None, Path(path))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        self.ensure_created()
        path = self._path(key)
        try:
            temp = self._write_temp(path, bytes(data))
            try:
                os.link(temp, path)
            except FileExistsError:
                return False
            finally:
                temp.unlink(missing_ok=True)
            self._fsync_dir(path.parent)
        except OSError as exc:
            raise self._fail("create", key, exc) from exc
        return True

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise self._fail("read", key, exc) from exc

    def open_binary(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        for directory, subdirectories, files in os.walk(self.root):
            relative = os.path.relpath(directory, self.root)
            base = "" if relative == "." else relative.replace(os.sep, "/") + "/"
            if not (base.startswith(prefix) or prefix.startswith(base)):
                subdirectories.clear()
                continue
            keys.extend(
                base + name
                for name in files
                if not name.startswith(TEMP_PREFIX) and (base + name).startswith(prefix)
            )
        return sorted(keys)

    def delete(self, key: str) -> None:
        """Remove the file, then the directories it leaves empty (never the store's root), so a
        generation that is cleaned away leaves no empty folder behind."""
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise self._fail("delete", key, exc) from exc
        parent = path.parent
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def move(self, source: str, destination: str) -> None:
        self.ensure_created()
        target = self._path(destination)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._path(source), target)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise self._fail("move", source, exc) from exc

    def url_for(self, key: str) -> str:
        return str(self._path(key))

    def storage_options(self) -> dict[str, str]:
        return {}

    def check(self, *, create: bool) -> None:
        """With `create`, make the directory and prove it writable with a probe file; without,
        only require that it exists (read-only consumers may open a read-only mount)."""
        if self.root.exists() and not self.root.is_dir():
            raise DoolyError(f"store {self.uri} is not a directory")
        if not create:
            if not self.root.is_dir():
                raise DoolyError(f"store {self.uri} does not exist (no such directory)")
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._write_temp(self.root / "probe", b"").unlink()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise DoolyError(f"store {self.uri} is not writable: {reason}") from exc

    def prepare_create(self) -> Callable[[], None] | None:
        """An existing directory is probed for writing (the probe is removed); a missing one needs
        its nearest existing ancestor to be a writable directory, and is made by the first write."""
        if self.root.exists():
            self.check(create=True)
            return None
        ancestor = self.root.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise DoolyError(f"store {self.uri} is not writable: {ancestor} is not a directory")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise DoolyError(f"store {self.uri} is not writable: {ancestor} is not writable")

        def create() -> None:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                reason = exc.strerror or type(exc).__name__
                raise DoolyError(f"store {self.uri} is not writable: {reason}") from exc

        return create


class _S3RangeReader(io.RawIOBase):
    """A seekable file over one S3 object that fetches byte ranges on demand (pyarrow reads the
    footer first, then only the column chunks it needs). Every range is asked for with the ETag
    seen at open, so an object replaced mid-read fails loudly instead of mixing two versions."""

    def __init__(self, store: S3Store, key: str) -> None:
        super().__init__()
        self._store = store
        self._key = key
        head = store._call("read", key, lambda c: c.head_object(Bucket=store.bucket, Key=key))
        self._size = int(head["ContentLength"])
        self._etag = head["ETag"]
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer) -> int:
        end = min(self._size, self._position + len(buffer))
        if end <= self._position:
            return 0
        byte_range = f"bytes={self._position}-{end - 1}"
        data = self._store._call(
            "read",
            self._key,
            lambda c: c.get_object(
                Bucket=self._store.bucket, Key=self._key, Range=byte_range, IfMatch=self._etag
            )["Body"].read(),
        )
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


class S3Store(Store):
    """A bucket (and key prefix) on AWS S3 or any S3-compatible server, through boto3.

    Credentials come from the arguments or boto3's usual chain (AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE, instance roles). boto3 is imported here,
    lazily, because the GPU image does not carry it.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff_base_s: float = BACKOFF_BASE_S,
        retry_deadline_s: float | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        self.region = region or _first_env(REGION_ENV_VARS) or DEFAULT_REGION
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.retry_deadline_s = (
            retry_deadline_s
            if retry_deadline_s is not None
            else _env_seconds(RETRY_DEADLINE_ENV, DEFAULT_RETRY_DEADLINE_S)
        )
        self.connect_deadline_s = _env_seconds(CONNECT_DEADLINE_ENV, 0.0)
        self.multipart_part_bytes = MULTIPART_PART_BYTES
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._access_key = access_key
        self._secret_key = secret_key
        self._client: Any = None
        self._session: Any = None
        self._client_lock = threading.Lock()
        # True while the bucket is missing and its creation waits for the first write.
        self._bucket_deferred = False

    @property
    def session(self) -> Any:
        """The boto3 session, made on first use; boto3 is imported here because the GPU image does
        not carry it."""
        with self._client_lock:
            if self._session is None:
                import boto3

                self._session = boto3.session.Session(
                    aws_access_key_id=self._access_key,
                    aws_secret_access_key=self._secret_key,
                    region_name=self.region,
                )
        return self._session

    @property
    def client(self) -> Any:
        """The S3 client, made once even when threads race to it."""
        session = self.session
        with self._client_lock:
            if self._client is None:
                from botocore.config import Config

                config = Config(
                    connect_timeout=CONNECT_TIMEOUT_S,
                    read_timeout=READ_TIMEOUT_S,
                    # Our own loop retries (bounded, and it knows which calls are safe to repeat).
                    retries={"total_max_attempts": 1},
                    s3={"addressing_style": "path"} if self.endpoint_url else {},
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                )
                self._client = session.client(
                    "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config
                )
        return self._client

    def _full(self, key: str) -> str:
        return self.prefix + _check_key(key)

    def _describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"store {self.uri}{where}"

    def _call(
        self,
        action: str,
        key: str,
        request: Callable[[Any], T],
        *,
        attempts: int | None = None,
        deadline_s: float | None = None,
        on_retry: Callable[[], None] | None = None,
    ) -> T:
        """Run one request, retrying transient failures until the attempts or the deadline run out
        (then TransientError, exit 75); other failures become one DoolyError (exit 2).

        A NoSuchKey/404 passes through as FileNotFoundError so callers can tell "absent" apart.
        """
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            HTTPClientError,
            NoCredentialsError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError

        limit = attempts or self.max_attempts
        give_up_at = time.monotonic() + (self.retry_deadline_s if deadline_s is None else deadline_s)
        for attempt in range(1, limit + 1):
            delay = min(BACKOFF_CAP_S, self.backoff_base_s * 2 ** (attempt - 1))
            delay *= random.uniform(0.5, 1.0)
            last = attempt == limit or time.monotonic() + delay > give_up_at
            try:
                return request(self.client)
            except NoCredentialsError as exc:
                raise DoolyError(
                    f"{self._describe()}: no AWS credentials (set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
                ) from exc
            except ClientError as exc:
                code, status = _client_error(exc)
                if code == "NoSuchBucket":
                    raise DoolyError(
                        f"{self._describe()}: bucket {self.bucket} does not exist"
                    ) from exc
                if status == HTTP_NOT_FOUND or code in ("NoSuchKey", "NotFound"):
                    raise FileNotFoundError(key) from exc
                if status == HTTP_FORBIDDEN:
                    raise DoolyError(
                        f"{self._describe()} refused to {action} {key or 'the bucket'} (HTTP 403 "
                        f"{code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket "
                        "policy"
                    ) from exc
                transient = status >= HTTP_SERVER_ERROR or code in TRANSIENT_S3_CODES
                if not transient or last:
                    message = exc.response.get("Error", {}).get("Message") or code or status
                    error = TransientError if transient else DoolyError
                    spent = f" after {attempt} attempts" if transient else ""
                    raise error(
                        f"{self._describe()}: cannot {action} {key or 'bucket'}{spent}: {message}"
                    ) from exc
                reason = code or str(status)
            except (BotoConnectionError, HTTPClientError) as exc:
                if last:
                    raise TransientError(
                        f"{self._describe()} is unreachable: cannot {action} {key or 'bucket'} "
                        f"after {attempt} attempts ({_one_line(exc)})"
                    ) from exc
                reason = type(exc).__name__
            except BotoCoreError as exc:
                raise DoolyError(
                    f"{self._describe()}: cannot {action} {key or 'bucket'}: {exc}"
                ) from exc
            logger.warning(
                "%s: %s %s failed (%s); retry %d/%d in %.2fs",
                self.uri,
                action,
                key,
                reason,
                attempt,
                limit - 1,
                delay,
            )
            if on_retry is not None:
                on_retry()
            time.sleep(delay)
        raise AssertionError("unreachable")

    def put_bytes(self, key: str, data: bytes) -> None:
        self.ensure_created()
        full = self._full(key)
        payload = bytes(data)
        self._call("write", key, lambda c: c.put_object(Bucket=self.bucket, Key=full, Body=payload))

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        """One PUT for small files; a multipart upload (each part retried on its own) for large
        ones. Either way the object appears only when complete; a failed upload is aborted."""
        self.ensure_created()
        full = self._full(key)
        size = os.path.getsize(path)
        part_bytes = self.multipart_part_bytes
        if size <= part_bytes:

            def put(client: Any) -> Any:
                with open(path, "rb") as handle:
                    return client.put_object(Bucket=self.bucket, Key=full, Body=handle)

            self._call("write", key, put)
            return
        upload = self._call(
            "write",
            key,
            lambda c: c.create_multipart_upload(Bucket=self.bucket, Key=full),
        )["UploadId"]
        try:
            parts = []
            with open(path, "rb") as handle:
                for number, offset in enumerate(range(0, size, part_bytes), start=1):
                    handle.seek(offset)
                    chunk = handle.read(part_bytes)

                    def upload_part(client: Any, number: int = number, body: bytes = chunk) -> Any:
                        return client.upload_part(Bucket=self.bucket, Key=full, UploadId=upload, PartNumber=number, Body=body)

                    response = self._call("write", key, upload_part)
                    parts.append({"PartNumber": number, "ETag": response["ETag"]})
            self._call(
                "write",
                key,
                lambda c: c.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload,
                    MultipartUpload={"Parts": parts},
                ),
            )
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload)
            except Exception:  # noqa: BLE001 - the original failure is the one to report
                logger.warning("%s: could not abort the multipart upload of %s", self.uri, key)
            raise

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Conditional PUT (If-None-Match: *). If an attempt's outcome was lost in transit and the
        retry finds the key taken, the stored bytes decide whether that lost attempt was ours."""
        from botocore.exceptions import ClientError

        self.ensure_created()
        full = self._full(key)
        payload = bytes(data)
        retried = []

        def request(client: Any) -> bool:
            try:
                client.put_object(Bucket=self.bucket, Key=full, Body=payload, IfNoneMatch="*")
            except ClientError as exc:
                code, status = _client_error(exc)
                if status == HTTP_PRECONDITION_FAILED or code == "PreconditionFailed":
                    return False
                raise
            return True

        created = self._call("create", key, request, on_retry=lambda: retried.append(True))
        if not created and retried:
            try:
                return self.get_bytes(key) == payload
            except FileNotFoundError:
                return False
        return created

    def get_bytes(self, key: str) -> bytes:
        if self._bucket_deferred:
            raise FileNotFoundError(key)
        full = self._full(key)
        return self._call(
            "read", key, lambda c: c.get_object(Bucket=self.bucket, Key=full)["Body"].read()
        )

    def open_binary(self, key: str) -> BinaryIO:
        if self._bucket_deferred:
            raise FileNotFoundError(key)
        return io.BufferedReader(_S3RangeReader(self, self._full(key)))

    def exists(self, key: str) -> bool:
        if self._bucket_deferred:
            return False
        full = self._full(key)
        try:
            self._call("read", key, lambda c: c.head_object(Bucket=self.bucket, Key=full))
        except FileNotFoundError:
            return False
        return True

    def list_keys(self, prefix: str) -> list[str]:
        if self._bucket_deferred:
            return []
        full_prefix = self.prefix + prefix

        def request(client: Any) -> list[str]:
            paginator = client.get_paginator("list_objects_v2")
            found: list[str] = []
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                found.extend(item["Key"][len(self.prefix) :] for item in page.get("Contents", []))
            return found

        return sorted(self._call("list", prefix, request))

    def delete(self, key: str) -> None:
        if self._bucket_deferred:
            return
        full = self._full(key)
        self._call("delete", key, lambda c: c.delete_object(Bucket=self.bucket, Key=full))

    def url_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def storage_options(self) -> dict[str, str]:
        """Endpoint, region and the credentials boto3 resolved, in the names polars understands."""
        credentials = self.session.get_credentials()
        options = {"aws_region": self.region}
        if self.endpoint_url:
            options["aws_endpoint_url"] = self.endpoint_url
            if self.endpoint_url.startswith("http://"):
                options["aws_allow_http"] = "true"
        if credentials is not None:
            frozen = credentials.get_frozen_credentials()
            options["aws_access_key_id"] = frozen.access_key
            options["aws_secret_access_key"] = frozen.secret_key
            if frozen.token:
                options["aws_session_token"] = frozen.token
        return options

    def check(self, *, create: bool) -> None:
        """One HEAD of the bucket; with `create`, make the bucket if it is missing."""
        try:
            self._call(
                "reach",
                "",
                lambda c: c.head_bucket(Bucket=self.bucket),
                attempts=None if self.connect_deadline_s else CHECK_MAX_ATTEMPTS,
                deadline_s=self.connect_deadline_s or None,
            )
        except FileNotFoundError:
            if not create:
                raise DoolyError(
                    f"{self._describe()}: bucket {self.bucket} does not exist"
                ) from None
            self._call(
                "create bucket",
                "",
                lambda c: c.create_bucket(Bucket=self.bucket),
            )

    def prepare_create(self) -> Callable[[], None] | None:
        """One HEAD of the bucket (unreachable, unauthorised: one error now); a missing bucket is
        created by the first write, and reads see it empty until then."""
        try:
            self.check(create=False)
            return None
        except DoolyError:
            if not self._bucket_missing():
                raise
        self._bucket_deferred = True

        def create() -> None:
            self.check(create=True)
            self._bucket_deferred = False

        return create

    def _bucket_missing(self) -> bool:
        try:
            self._call(
                "reach",
                "",
                lambda c: c.head_bucket(Bucket=self.bucket),
                attempts=None if self.connect_deadline_s else CHECK_MAX_ATTEMPTS,
                deadline_s=self.connect_deadline_s or None,
            )
        except FileNotFoundError:
            return True
        return False


def _client_error(exc: Any) -> tuple[str, int]:
    error = exc.response.get("Error", {})
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return str(error.get("Code", "")), status


def _env_seconds(name: str, default: float) -> float:
    """A non-negative number of seconds from the environment; a bad value is one error line."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise DoolyError(f"${name} must be a number of seconds >= 0, got {text!r}")
    return value


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _first_env(names: tuple[str, ...]) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def open_store(
    uri: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    create: bool = True,
    defer_create: bool = False,
) -> Store:
    """The store behind `uri`, checked reachable and of this Dooly's schema version.

    "./db", "/abs/path" and "file:///abs/path" open a LocalStore; "s3://bucket/prefix" an S3Store
    whose endpoint is `endpoint_url`, else $DOOLY_S3_ENDPOINT_URL, $AWS_ENDPOINT_URL_S3 or
    $AWS_ENDPOINT_URL (AWS itself when none is set). With `create`, a missing directory or bucket is
    made and the schema marker written; without it, a missing store is an error.

    `defer_create` (what a command that writes uses) checks, creating nothing, that the store
    could be made and written, and leaves the making to the first write (`Store.ensure_created`):
    a command that then fails on its inputs leaves no directory, bucket or marker behind.
    """
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise DoolyError(f"store {uri}: no bucket name (expected s3://bucket/prefix)")
        store: Store = S3Store(
            bucket,
            prefix,
            endpoint_url=endpoint_url or _first_env(ENDPOINT_ENV_VARS),
            region=region,
        )
    elif uri.startswith("file://"):
        store = LocalStore(uri[len("file://") :])
    elif "://" in uri:
        raise DoolyError(f"store {uri}: unsupported scheme (use a directory, file:// or s3://)")
    else:
        store = LocalStore(uri)
    if create:
        creation = store.prepare_create()
    else:
        store.check(create=False)
        creation = None
    marker_missing = _check_marker(store)
    if create and (creation is not None or marker_missing):
        store._arm_creation(creation, write_marker=marker_missing)
        if not defer_create:
            store.ensure_created()
    return store


def _check_marker(store: Store) -> bool:
    """Refuse a store written by a Dooly of another schema version; True when it has no marker yet
    (a new store: the marker is written with its first object)."""
    try:
        marker = json.loads(store.get_bytes(MARKER_KEY))
    except FileNotFoundError:
        return True
    except ValueError as exc:
        raise DoolyError(f"store {store.uri}: {MARKER_KEY} is not valid JSON") from exc
    version = marker.get("schema_version") if isinstance(marker, dict) else None
    if version != SCHEMA_VERSION:
        raise DoolyError(
            f"store {store.uri} holds schema version {version}; this Dooly reads version "
            f"{SCHEMA_VERSION}"
        )
    return False
