"""Artifacts: files a job's runner or external system uploads. What a name and a content type
may be, the upload as the store receives it, and the expiring signed links that serve an
artifact's bytes without any other credential (the URLs in a terminal event's webhook).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeSerializer

from gateway.models import Artifact

NAME_PATTERN = r"[A-Za-z0-9._-]{1,128}"
DEFAULT_CONTENT_TYPE = "application/octet-stream"
MAX_CONTENT_TYPE = 255
MAX_SIGNED_LENGTH = 1024
LINK_SALT = "gateway.artifact"
_NAME = re.compile(NAME_PATTERN)
_CONTENT_TYPE = re.compile(r"[!-~][ -~]*")  # printable ASCII, no leading space


def name_problem(name: str) -> str | None:
    """Why `name` cannot name an artifact, or None. `.` and `..` fit the pattern but no URL can
    carry them (clients resolve them as path segments), so they are refused too."""
    if not _NAME.fullmatch(name) or name in (".", ".."):
        return f"an artifact name is 1-128 of A-Z a-z 0-9 . _ - (not . or ..); got {name[:140]!r}"
    return None


def content_type_problem(content_type: str) -> str | None:
    if len(content_type) > MAX_CONTENT_TYPE or not _CONTENT_TYPE.fullmatch(content_type):
        return f"`Content-Type` must be printable ASCII, at most {MAX_CONTENT_TYPE} characters"
    return None


@dataclass(frozen=True)
class ArtifactUpload:
    """One artifact as uploaded: checked name and content type, the bytes and their digest."""

    name: str
    content_type: str
    data: bytes
    sha256: str

    @classmethod
    def of(cls, name: str, content_type: str, data: bytes) -> ArtifactUpload:
        return cls(name, content_type, data, hashlib.sha256(data).hexdigest())

    @property
    def artifact(self) -> Artifact:
        return Artifact(
            name=self.name, content_type=self.content_type, size=len(self.data), sha256=self.sha256
        )


@dataclass(frozen=True)
class LinkTarget:
    """What a signed link points at, and until when it works."""

    job_id: str
    name: str
    expires_at: int


class ArtifactLinks:
    """Signs and opens `{base_url}/artifacts/{signed}` links under the secret key.

    The expiry is inside the signed payload (fixed when the link is minted, as the webhook that
    carries it says), so the clock that judges it is the caller's: the injected one."""

    def __init__(self, secret_key: str, base_url: str, ttl_s: int) -> None:
        self._serializer = URLSafeSerializer(
            secret_key, salt=LINK_SALT, signer_kwargs={"digest_method": hashlib.sha256}
        )
        self._base_url = base_url.rstrip("/")
        self.ttl_s = ttl_s

    def mint(self, job_id: str, name: str, now: float) -> tuple[str, int]:
        """A link to the artifact `name` of `job_id` valid from `now` for `ttl_s`; with its
        expiry (epoch seconds)."""
        expires_at = int(now) + self.ttl_s
        signed = self._serializer.dumps([job_id, name, expires_at])
        return f"{self._base_url}/artifacts/{signed}", expires_at

    def open(self, signed: str) -> LinkTarget | None:
        """The target of a link this server minted (expired or not), or None when forged."""
        if len(signed) > MAX_SIGNED_LENGTH:
            return None
        try:
            payload = self._serializer.loads(signed)
        except (BadSignature, UnicodeError, ValueError):
            return None
        match payload:
            case [str(job_id), str(name), int(expires_at)]:
                return LinkTarget(job_id=job_id, name=name, expires_at=expires_at)
        return None
