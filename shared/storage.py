"""The object store (any S3 server: MinIO in production, SeaweedFS locally) through the minio client.

Only the services that own buckets hold these credentials; everyone else gets presigned URLs.
"""

from __future__ import annotations

import asyncio
import io
from datetime import timedelta

import urllib3
from minio import Minio
from minio.commonconfig import CopySource
from minio.datatypes import Part
from minio.error import S3Error

from shared.errors import NotFoundError, ServiceUnavailableError, StorageError
from shared.settings import StoreSettings

URL_TTL = timedelta(hours=6)


def _minio(settings: StoreSettings, endpoint: str) -> Minio:
    return Minio(
        endpoint,
        access_key=settings.access_key,
        secret_key=settings.secret_key,
        secure=settings.secure,
        region=settings.region,
    )


class ObjectStore:
    """Async facade over the (blocking) minio client; calls run in worker threads."""

    def __init__(self, settings: StoreSettings) -> None:
        self.bucket = settings.bucket
        self._client = _minio(settings, settings.endpoint)
        # URLs are signed for the host that uses them: the signature covers the host, so a URL for the internal
        # name would not work from another machine. Signing is local (the region is given: no lookup).
        self.public_endpoint = settings.public_endpoint or settings.endpoint
        self._signer = self._client
        if self.public_endpoint != settings.endpoint:
            self._signer = _minio(settings, self.public_endpoint)

    async def _call(self, fn, *args, **kwargs):
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NoSuchBucket"):
                raise NotFoundError(f"object {exc.resource or ''} not found") from exc
            raise StorageError(f"object store error {exc.code}: {exc.message}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            # The server is down or restarting: callers wait it out (a request replies "unavailable"; a consumer
            # retries the message), instead of failing the run or crashing on an internal error.
            raise ServiceUnavailableError(f"the object store is not reachable: {exc.__class__.__name__}") from exc

    async def ensure_bucket(self) -> None:
        if not await self._call(self._client.bucket_exists, self.bucket):
            try:
                await self._call(self._client.make_bucket, self.bucket)
            except StorageError:
                if not await self._call(self._client.bucket_exists, self.bucket):
                    raise

    async def stat(self, key: str) -> tuple[int, str] | None:
        """(size, etag) of an object, or None when it does not exist."""
        try:
            st = await self._call(self._client.stat_object, self.bucket, key)
        except NotFoundError:
            return None
        return int(st.size or 0), (st.etag or "").strip('"')

    async def presign_put(self, key: str) -> str:
        return await self._call(self._signer.presigned_put_object, self.bucket, key, expires=URL_TTL)

    async def presign_get(self, key: str) -> str:
        return await self._call(self._signer.presigned_get_object, self.bucket, key, expires=URL_TTL)

    async def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        await self._call(self._client.put_object, self.bucket, key, io.BytesIO(data), len(data), content_type)

    async def get_bytes(self, key: str) -> bytes:
        def _get() -> bytes:
            resp = self._client.get_object(self.bucket, key)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return await self._call(_get)

    # Multipart, driven through presigned part URLs: the uploader never holds credentials. These use minio-py's
    # multipart primitives (pinned below 8 in pyproject), which its public API only offers for local files.
    async def start_multipart(self, key: str) -> str:
        return await self._call(self._client._create_multipart_upload, self.bucket, key, {})

    async def presign_part(self, key: str, upload_id: str, part_number: int) -> str:
        return await self._call(
            self._signer.get_presigned_url,
            "PUT",
            self.bucket,
            key,
            expires=URL_TTL,
            extra_query_params={"uploadId": upload_id, "partNumber": str(part_number)},
        )

    async def complete_multipart(self, key: str, upload_id: str, etags: list[tuple[int, str]]) -> None:
        parts = [Part(number, etag) for number, etag in sorted(etags)]
        await self._call(self._client._complete_multipart_upload, self.bucket, key, upload_id, parts)

    async def abort_incomplete(self, prefix: str) -> int:
        """Abort every multipart upload still open under ``prefix`` (an uploader that failed or died half-way);
        the parts it stored go with it. Returns how many were aborted."""

        def _abort() -> int:
            aborted = 0
            result = self._client._list_multipart_uploads(self.bucket, prefix=prefix, max_uploads=1000)
            for upload in result.uploads:
                if upload.object_name.startswith(prefix):
                    self._client._abort_multipart_upload(self.bucket, upload.object_name, upload.upload_id)
                    aborted += 1
            return aborted

        return await self._call(_abort)

    async def remove(self, key: str) -> None:
        await self._call(self._client.remove_object, self.bucket, key)

    async def copy(self, src_key: str, dst_key: str) -> None:
        await self._call(self._client.copy_object, self.bucket, dst_key, CopySource(self.bucket, src_key))

    async def list(self, prefix: str) -> list[tuple[str, int, str]]:
        def _list() -> list[tuple[str, int, str]]:
            return [
                (o.object_name or "", int(o.size or 0), (o.etag or "").strip('"'))
                for o in self._client.list_objects(self.bucket, prefix=prefix, recursive=True)
            ]

        return await self._call(_list)
