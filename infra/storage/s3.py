"""S3 backend (AWS or any S3-compatible endpoint: MinIO, Ceph, R2, moto...).

Endpoint: the `endpoint_url` option, else env QUANTFLEET_S3_ENDPOINT_URL, else AWS_ENDPOINT_URL_S3 /
AWS_ENDPOINT_URL (read by botocore itself), else AWS. Region and credentials come from the usual
AWS chain (env vars, ~/.aws/config, instance roles); they are never logged.

Integrity: each object's SHA-256 is computed while streaming and stored as `x-amz-meta-sha256`;
each request body also carries `x-amz-checksum-sha256`, which AWS S3 verifies before accepting
it. (moto 5.2.5 stores but does not verify it; tests/infra/test_s3_checksums.py pins that.)
botocore's own default CRC trailers are switched off ("when_required") because several
S3-compatible servers reject them.

Faults: botocore's retries are disabled so that one policy (`RetryPolicy`, exponential backoff
with jitter) governs every call; errors are translated to `infra.errors` classes once, here.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import boto3
import botocore.exceptions as bce
from botocore.config import Config
from pydantic import BaseModel, ConfigDict, Field
from urllib3.exceptions import HTTPError as URLLib3HTTPError

from infra.errors import (
    AccessDenied,
    AlreadyExists,
    CredentialsRejected,
    InvalidURI,
    ObjectNotFound,
    StorageError,
    TransientStorageError,
)
from infra.retry import RetryPolicy, retry_call
from infra.storage.base import (
    ObjectInfo,
    ObjectWriter,
    Storage,
    WriteResult,
    check_key,
    check_prefix,
    join_key,
)
from infra.storage.parts import MAX_PART_SIZE, MIN_PART_SIZE, MiB, PartPlan

__all__ = ["ENDPOINT_ENV", "S3Options", "S3Storage", "translate_error"]

ENDPOINT_ENV = "QUANTFLEET_S3_ENDPOINT_URL"
SHA256_META = "sha256"  # stored as the x-amz-meta-sha256 header

T = TypeVar("T")

_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "RequestLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "BandwidthLimitExceeded",
        "ConditionalRequestConflict",  # 409: a concurrent conditional write; retry decides
    }
)
_DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled"})
# The credentials themselves, not what they may do. ExpiredToken and its kin are 400s: a session
# token (STS, SSO) that ran out during a long run.
_REJECTED_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired"}
)
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})


class S3Options(BaseModel):
    """Tunables of the S3 backend; every field has a working default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] | None = None
    retry: RetryPolicy = RetryPolicy()
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    max_pool_connections: int = Field(default=16, ge=1)
    min_part_size: int = Field(default=16 * MiB, ge=MIN_PART_SIZE, le=MAX_PART_SIZE)
    upload_concurrency: int = Field(default=2, ge=1, description="parts in flight per writer")
    copy_part_size: int = Field(default=512 * MiB, ge=MIN_PART_SIZE, le=MAX_PART_SIZE)
    read_chunk_bytes: int = Field(default=1 * MiB, ge=4096)

    def resolved_endpoint(self) -> str | None:
        return self.endpoint_url or os.environ.get(ENDPOINT_ENV) or None


def _client_error_parts(exc: bce.ClientError) -> tuple[str, int, str]:
    err = exc.response.get("Error", {})
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return str(err.get("Code", "")), status, str(err.get("Message", "")).strip()


def translate_error(exc: BaseException, uri: str, op: str) -> StorageError:
    """Map a boto/urllib3/socket exception to the infra error class that decides what happens."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, bce.ClientError):
        code, status, message = _client_error_parts(exc)
        detail = f"{code or status}: {message}" if message else (code or str(status))
        if code in _TRANSIENT_CODES or status in (429, 500, 502, 503, 504):
            return TransientStorageError(f"{uri}: {op} failed transiently ({detail})")
        if code in _REJECTED_CODES:
            return CredentialsRejected(f"{uri}: access denied ({op}): {detail}")
        if code in _DENIED_CODES or status == 403:
            return AccessDenied(f"{uri}: access denied ({op}): {detail}")
        if code in _MISSING_CODES or status == 404:
            what = "bucket does not exist" if code == "NoSuchBucket" else "not found"
            return ObjectNotFound(f"{uri}: {what} ({op})")
        if code == "PreconditionFailed" or status == 412:
            return AlreadyExists(f"{uri}: already exists; refusing to overwrite ({op})")
        return StorageError(f"{uri}: {op} failed ({detail})")
    if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
        return CredentialsRejected(
            f"{uri}: no usable AWS credentials ({op}); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "or AWS_PROFILE"
        )
    if isinstance(exc, bce.EndpointConnectionError):  # say where: most often a wrong endpoint
        endpoint = urlsplit(str(exc.kwargs.get("endpoint_url", "")))
        return TransientStorageError(
            f"{uri}: {op} failed transiently: cannot connect to {endpoint.scheme}://{endpoint.netloc} "
            f"(the S3 endpoint: AWS_ENDPOINT_URL or {ENDPOINT_ENV})"
        )
    transient = (
        bce.HTTPClientError,  # connection closed, read timeout, response streaming error
        bce.ConnectionError,  # endpoint unreachable, connect timeout
        bce.IncompleteReadError,
        URLLib3HTTPError,
        ConnectionError,  # builtin: resets, broken pipes
        TimeoutError,
    )
    if isinstance(exc, transient):
        return TransientStorageError(f"{uri}: {op} failed transiently ({type(exc).__name__})")
    if isinstance(exc, bce.ParamValidationError):
        return InvalidURI(f"{uri}: {op}: invalid request ({exc})")
    return StorageError(f"{uri}: {op} failed ({type(exc).__name__}: {exc})")


def _b64_sha256(data: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


def _strip_etag(etag: str | None) -> str | None:
    return etag.strip('"') if etag else None


class S3Storage(Storage):
    """Objects under `s3://bucket/prefix`; keys are relative to the prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        options: S3Options | None = None,
        *,
        client: Any | None = None,
    ) -> None:
        if not bucket:
            raise InvalidURI("S3 storage needs a bucket name")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.options = options or S3Options()
        self.client = client or self._make_client()

    def __repr__(self) -> str:
        return f"S3Storage({self.uri()!r})"

    def _make_client(self) -> Any:
        o = self.options
        config = Config(
            region_name=o.region,
            connect_timeout=o.connect_timeout_s,
            read_timeout=o.read_timeout_s,
            max_pool_connections=o.max_pool_connections,
            # One retry policy (ours) instead of two stacked ones; makes attempt counts exact.
            retries={"total_max_attempts": 1, "mode": "standard"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": o.addressing_style or "auto"},
        )
        session = boto3.session.Session(profile_name=o.profile) if o.profile else boto3
        return session.client("s3", endpoint_url=o.resolved_endpoint(), config=config)

    # --- helpers -----------------------------------------------------------------------

    def uri(self, key: str = "") -> str:
        path = join_key(self.prefix, key)
        return f"s3://{self.bucket}/{path}" if path else f"s3://{self.bucket}"

    def _full(self, key: str) -> str:
        return join_key(self.prefix, check_key(key))

    def _rel(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    def _call(self, uri: str, op: str, fn: Callable[[], T]) -> T:
        """Run one request (or request+body read) with translation and retries."""

        def attempt() -> T:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - translated, then re-raised
                raise translate_error(exc, uri, op) from exc

        return retry_call(attempt, self.options.retry)

    # --- reading -----------------------------------------------------------------------

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        full_prefix = join_key(self.prefix, prefix) + ("/" if prefix.endswith("/") else "")
        if self.prefix and not prefix:
            full_prefix = self.prefix + "/"
        token: str | None = None
        while True:  # paginated by hand so each page gets the retry policy
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full_prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call(self.uri(prefix), "list", partial(self.client.list_objects_v2, **kwargs))
            for item in page.get("Contents", []):
                yield ObjectInfo(
                    key=self._rel(item["Key"]), size=item["Size"], etag=_strip_etag(item["ETag"])
                )
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def stat(self, key: str) -> ObjectInfo:
        head = self._call(
            self.uri(key),
            "stat",
            lambda: self.client.head_object(Bucket=self.bucket, Key=self._full(key)),
        )
        return ObjectInfo(
            key=key,
            size=head["ContentLength"],
            etag=_strip_etag(head.get("ETag")),
            sha256=head.get("Metadata", {}).get(SHA256_META),
        )

    def read_range_into(self, key: str, offset: int, buffer: memoryview) -> None:
        view = buffer.cast("B")
        if len(view) == 0:
            return
        full = self._full(key)
        chunk = self.options.read_chunk_bytes

        def fetch() -> None:
            # One attempt = request + reading the whole body; a reset mid-body restarts the range.
            resp = self.client.get_object(
                Bucket=self.bucket, Key=full, Range=f"bytes={offset}-{offset + len(view) - 1}"
            )
            body = resp["Body"]
            try:
                done = 0
                while done < len(view):
                    n = body.readinto(view[done : done + chunk])
                    if n == 0:
                        raise StorageError(
                            f"{self.uri(key)}: short read: wanted {len(view)} bytes at offset "
                            f"{offset}, got {done}"
                        )
                    done += n
            finally:
                body.close()

        self._call(self.uri(key), "read", fetch)

    # --- writing -----------------------------------------------------------------------

    def open_writer(self, key: str, *, size_hint: int | None = None, if_absent: bool = False) -> ObjectWriter:
        return _S3Writer(self, key, size_hint=size_hint, if_absent=if_absent)

    def _put(
        self, key: str, data: bytes | bytearray | memoryview, sha256: str, if_absent: bool
    ) -> str | None:
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._full(key),
            "Body": bytes(data),
            "ChecksumSHA256": _b64_sha256(data),
            "Metadata": {SHA256_META: sha256},
        }
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        resp = self._call(self.uri(key), "put", lambda: self.client.put_object(**kwargs))
        return _strip_etag(resp.get("ETag"))

    def copy(self, src_key: str, dst_key: str, *, if_absent: bool = False) -> ObjectInfo:
        src = self.stat(src_key)
        metadata = {SHA256_META: src.sha256} if src.sha256 else {}
        self._copy(src, dst_key, metadata, if_absent=if_absent)
        return self.stat(dst_key)

    def _copy(self, src: ObjectInfo, dst_key: str, metadata: dict[str, str], *, if_absent: bool) -> None:
        if src.size == 0:
            # Ranged part copies cannot express an empty range.
            kwargs: dict[str, Any] = {
                "Bucket": self.bucket,
                "Key": self._full(dst_key),
                "Body": b"",
                "Metadata": metadata,
            }
            if if_absent:
                kwargs["IfNoneMatch"] = "*"
            self._call(self.uri(dst_key), "copy", lambda: self.client.put_object(**kwargs))
            return
        if not if_absent and src.size <= MAX_PART_SIZE:
            copy_kwargs: dict[str, Any] = {
                "Bucket": self.bucket,
                "Key": self._full(dst_key),
                "CopySource": {"Bucket": self.bucket, "Key": self._full(src.key)},
                "MetadataDirective": "REPLACE",
                "Metadata": metadata,
            }
            if src.etag:  # copy exactly the version we stat'ed, not a newer one
                copy_kwargs["CopySourceIfMatch"] = f'"{src.etag}"'
            self._call(self.uri(dst_key), "copy", lambda: self.client.copy_object(**copy_kwargs))
            return
        # Server-side multipart copy: works beyond CopyObject's 5 GiB limit, and its completion
        # can be made conditional (IfNoneMatch), which CopyObject cannot.
        _MultipartCopy(self, src, dst_key, metadata, if_absent=if_absent).run()

    def delete(self, key: str) -> None:
        self._call(
            self.uri(key),
            "delete",
            lambda: self.client.delete_object(Bucket=self.bucket, Key=self._full(key)),
        )

    def delete_prefix(self, prefix: str) -> int:
        keys = [info.key for info in self.list(prefix)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
            batch = [{"Key": self._full(k)} for k in keys[start : start + 1000]]
            resp = self._call(
                self.uri(prefix),
                "delete",
                partial(
                    self.client.delete_objects,
                    Bucket=self.bucket,
                    Delete={"Objects": batch, "Quiet": True},
                ),
            )
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise StorageError(
                    f"{self.uri(self._rel(first['Key']))}: delete failed ({first.get('Code')})"
                )
        return len(keys)

    # --- multipart housekeeping --------------------------------------------------------

    def pending_uploads(self, prefix: str = "") -> builtins.list[tuple[str, str, float]]:
        """(key, upload id, start time) of every unfinished multipart upload under `prefix`."""
        full_prefix = join_key(self.prefix, prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        if prefix.endswith("/") and full_prefix:
            full_prefix += "/"  # `a/run-1/` must not match `a/run-10/...`
        found: builtins.list[tuple[str, str, float]] = []
        markers: dict[str, str] = {}
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full_prefix, **markers}
            page = self._call(
                self.uri(prefix),
                "list uploads",
                partial(self.client.list_multipart_uploads, **kwargs),
            )
            for up in page.get("Uploads", []):
                found.append((self._rel(up["Key"]), up["UploadId"], up["Initiated"].timestamp()))
            if not page.get("IsTruncated"):
                return found
            markers = {
                "KeyMarker": page["NextKeyMarker"],
                "UploadIdMarker": page["NextUploadIdMarker"],
            }

    def abort_stale_uploads(self, prefix: str = "", *, older_than_s: float = 0.0) -> int:
        cutoff = time.time() - older_than_s
        count = 0
        for key, upload_id, started in self.pending_uploads(prefix):
            if started <= cutoff:
                self._abort(key, upload_id)
                count += 1
        return count

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self._call(
                self.uri(key),
                "abort upload",
                lambda: self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=self._full(key), UploadId=upload_id
                ),
            )
        except ObjectNotFound:
            pass  # NoSuchUpload: already gone


class _MultipartUpload:
    """One multipart upload: create lazily, parts in flight bounded, complete or abort."""

    def __init__(self, storage: S3Storage, key: str, metadata: dict[str, str]) -> None:
        self.s = storage
        self.key = key
        self.metadata = metadata
        self.upload_id: str | None = None
        self.parts: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def create(self, checksums: bool = True) -> None:
        kwargs: dict[str, Any] = {
            "Bucket": self.s.bucket,
            "Key": self.s._full(self.key),
            "Metadata": self.metadata,
        }
        if checksums:
            kwargs["ChecksumAlgorithm"] = "SHA256"
        resp = self.s._call(
            self.s.uri(self.key),
            "create upload",
            lambda: self.s.client.create_multipart_upload(**kwargs),
        )
        self.upload_id = resp["UploadId"]

    def record(self, number: int, part: dict[str, Any]) -> None:
        with self._lock:
            self.parts[number] = part

    def complete(self, if_absent: bool) -> str | None:
        assert self.upload_id is not None
        kwargs: dict[str, Any] = {
            "Bucket": self.s.bucket,
            "Key": self.s._full(self.key),
            "UploadId": self.upload_id,
            "MultipartUpload": {"Parts": [self.parts[n] for n in sorted(self.parts)]},
        }
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        resp = self.s._call(
            self.s.uri(self.key),
            "complete upload",
            lambda: self.s.client.complete_multipart_upload(**kwargs),
        )
        return _strip_etag(resp.get("ETag"))

    def abort(self) -> None:
        if self.upload_id is not None:
            self.s._abort(self.key, self.upload_id)


class _S3Writer(ObjectWriter):
    """Buffers one part at a time; objects smaller than a part become a single PUT."""

    def __init__(self, storage: S3Storage, key: str, *, size_hint: int | None, if_absent: bool) -> None:
        super().__init__()
        check_key(key)
        self.s = storage
        self.key = key
        self.if_absent = if_absent
        self.plan = PartPlan(size_hint, storage.options.min_part_size)
        self.upload = _MultipartUpload(storage, key, metadata={})
        self.part_number = 1
        self.buffer = bytearray()
        self.pool: ThreadPoolExecutor | None = None
        self.in_flight: list[Future[None]] = []
        self.slots = threading.BoundedSemaphore(storage.options.upload_concurrency)

    def _write(self, view: memoryview) -> None:
        pos = 0
        while pos < len(view):
            room = self.plan.size_of(self.part_number) - len(self.buffer)
            take = min(room, len(view) - pos)
            self.buffer += view[pos : pos + take]
            pos += take
            if len(self.buffer) == self.plan.size_of(self.part_number):
                self._flush_part()

    def _flush_part(self) -> None:
        if self.upload.upload_id is None:
            self.upload.create()
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.s.options.upload_concurrency, thread_name_prefix="qf-s3-part")
        self._raise_failed_parts()
        data, number = bytes(self.buffer), self.part_number
        self.buffer = bytearray()
        self.part_number += 1
        self.slots.acquire()  # bounds memory: at most `upload_concurrency` parts in flight
        self.in_flight.append(self.pool.submit(self._upload_part, number, data))

    def _upload_part(self, number: int, data: bytes) -> None:
        try:
            checksum = _b64_sha256(data)
            resp = self.s._call(
                self.s.uri(self.key),
                f"upload part {number}",
                lambda: self.s.client.upload_part(
                    Bucket=self.s.bucket,
                    Key=self.s._full(self.key),
                    UploadId=self.upload.upload_id,
                    PartNumber=number,
                    Body=data,
                    ChecksumSHA256=checksum,
                ),
            )
            self.upload.record(
                number, {"PartNumber": number, "ETag": resp["ETag"], "ChecksumSHA256": checksum}
            )
        finally:
            self.slots.release()

    def _raise_failed_parts(self) -> None:
        pending = []
        for fut in self.in_flight:
            if fut.done():
                fut.result()  # re-raises a part's StorageError in the writing thread
            else:
                pending.append(fut)
        self.in_flight = pending

    def _wait_parts(self) -> None:
        for fut in self.in_flight:
            fut.result()
        self.in_flight = []

    def _finish(self, sha256: str) -> WriteResult:
        if self.upload.upload_id is None:  # small object: one conditional PUT
            etag = self.s._put(self.key, self.buffer, sha256, self.if_absent)
        else:
            if self.buffer:
                self._flush_part()
            self._wait_parts()
            self._shutdown()
            etag = self.upload.complete(self.if_absent)
            etag = self._record_sha256(etag, sha256)
        return WriteResult(key=self.key, uri=self.s.uri(self.key), size=self._size, sha256=sha256, etag=etag)

    def _record_sha256(self, etag: str | None, sha256: str) -> str | None:
        # Multipart metadata is fixed at CreateMultipartUpload, before the hash is known; a
        # server-side self-copy (guarded by the ETag we just wrote) attaches it.
        info = ObjectInfo(key=self.key, size=self._size, etag=etag)
        self.s._copy(info, self.key, {SHA256_META: sha256}, if_absent=False)
        return self.s.stat(self.key).etag

    def _shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None

    def _discard(self) -> None:
        self.buffer = bytearray()
        for fut in self.in_flight:
            fut.cancel()
        self._shutdown()
        self.in_flight = []
        try:
            self.upload.abort()
        except StorageError:
            # Leave it for abort_stale_uploads(); the original error matters more.
            pass


class _MultipartCopy:
    """Server-side copy in ranged parts (UploadPartCopy), completed conditionally if asked."""

    def __init__(
        self,
        storage: S3Storage,
        src: ObjectInfo,
        dst_key: str,
        metadata: dict[str, str],
        *,
        if_absent: bool,
    ) -> None:
        self.s = storage
        self.src = src
        self.if_absent = if_absent
        self.upload = _MultipartUpload(storage, dst_key, metadata)

    def run(self) -> None:
        part_size = max(self.s.options.copy_part_size, -(-self.src.size // 10_000))
        self.upload.create(checksums=False)
        try:
            for number, start in enumerate(range(0, self.src.size, part_size), start=1):
                end = min(start + part_size, self.src.size) - 1
                self._copy_part(number, start, end)
            self.upload.complete(self.if_absent)
        except BaseException:
            self.upload.abort()
            raise

    def _copy_part(self, number: int, start: int, end: int) -> None:
        kwargs: dict[str, Any] = {
            "Bucket": self.s.bucket,
            "Key": self.s._full(self.upload.key),
            "UploadId": self.upload.upload_id,
            "PartNumber": number,
            "CopySource": {"Bucket": self.s.bucket, "Key": self.s._full(self.src.key)},
            "CopySourceRange": f"bytes={start}-{end}",
        }
        if self.src.etag:
            kwargs["CopySourceIfMatch"] = f'"{self.src.etag}"'
        resp = self.s._call(
            self.s.uri(self.upload.key),
            f"copy part {number}",
            lambda: self.s.client.upload_part_copy(**kwargs),
        )
        self.upload.record(number, {"PartNumber": number, "ETag": resp["CopyPartResult"]["ETag"]})
