"""The firmware store: technicians upload `.bin` images, devices download them on the LAN.

`POST /api/v1/firmware?version=...&device_type=...` (Bearer JWT, `application/octet-stream`, up to
`web.firmware_max_bytes`) streams the body to `{firmware_dir}/{sha256}.bin` (written to a temporary
file, fsynced, renamed) and records version, size and sha256; uploading the same bytes again answers
the existing image. `GET /firmware/{sha256}.bin` serves an image without authentication (ESP32 OTA
clients cannot sign), with ETag and Range support. UPDATE_FIRMWARE commands name an image by id and
the web fills in its `url`, `version`, `sha256` and `size`.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, jsonify, request, send_file

from gateway.clock import iso_z, utc_now
from gateway.store import write_tx
from gateway.store.models import FirmwareImage
from web.auth import require_technician
from web.body import SQLITE_MAX_INT
from web.context import ctx, require_db
from web.errors import ApiError
from web.openapi import doc

bp = Blueprint("firmware", __name__)

UPLOAD_PATH = "/api/v1/firmware"
# \Z, not $: Python's `$` also matches before a trailing newline.
VERSION_RE = re.compile(r"^[\x21-\x7e]{1,64}\Z")
SHA_RE = re.compile(r"^[0-9a-f]{64}\Z")
DEVICE_TYPES = ("CAR_WASH", "HELMET_DRYER")
CHUNK = 64 * 1024


def firmware_dir() -> Path:
    return Path(ctx().config.paths.firmware_dir)


def download_url(image: FirmwareImage) -> str:
    base = ctx().config.web.device_base_url or request.host_url
    return f"{base.rstrip('/')}/firmware/{image.filename}"


def _view(image: FirmwareImage) -> dict[str, Any]:
    return {"id": image.id, "version": image.version, "sha256": image.sha256, "size": image.size,
            "device_type": image.device_type, "uploaded_at": iso_z(image.uploaded_at), "url": download_url(image)}


@bp.post(UPLOAD_PATH)
@doc("Upload a firmware image (raw bytes); answers its id, sha256, size and download URL", tags=("firmware",),
     request={"type": "string", "format": "binary"}, request_content_type="application/octet-stream",
     response={"type": "object"}, status=201, errors=(400, 401, 413, 415),
     params={"version": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,64}$"},
             "device_type": {"enum": list(DEVICE_TYPES)}},
     required_params=("version",), security="bearer")
def upload() -> Any:
    require_technician()
    version, device_type = request.args.get("version", ""), request.args.get("device_type") or None
    if not VERSION_RE.match(version):
        raise ApiError(400, "VALIDATION_FAILED", "version: 1 to 64 printable characters, no spaces")
    if device_type is not None and device_type not in DEVICE_TYPES:
        raise ApiError(400, "VALIDATION_FAILED", f"device_type must be one of {', '.join(DEVICE_TYPES)}")
    if request.mimetype != "application/octet-stream":
        raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE", "Content-Type must be application/octet-stream")
    folder = firmware_dir()
    created = [d for d in (folder, *folder.parents) if not d.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".upload-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            while chunk := request.stream.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if size == 0:
            raise ApiError(400, "VALIDATION_FAILED", "the image is empty")
        sha = digest.hexdigest()
        existing = FirmwareImage.get_or_none(FirmwareImage.sha256 == sha)
        if existing is not None:
            return jsonify({"success": True, "data": _view(existing), "message": "Image already stored"}), 200
        filename = f"{sha}.bin"
        os.replace(tmp, folder / filename)
        tmp = ""
        # The rename, the folder's own name and those of the folders this upload created survive
        # a power cut before the row does (fsyncing a folder does not make its name durable).
        for d in dict.fromkeys((folder, folder.parent, *(c.parent for c in created))):
            dir_fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        with write_tx(require_db()):
            image = FirmwareImage.create(version=version, filename=filename, sha256=sha, size=size,
                                         device_type=device_type, uploaded_at=utc_now())
    finally:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
    return jsonify({"success": True, "data": _view(image), "message": "Firmware stored"}), 201


@bp.get(UPLOAD_PATH)
@doc("Stored firmware images, newest first", tags=("firmware",), response={"type": "object"}, errors=(401,),
     security="bearer")
def list_images() -> Any:
    require_technician()
    rows = FirmwareImage.select().order_by(FirmwareImage.id.desc())
    return jsonify({"success": True, "data": [_view(i) for i in rows]})


@bp.delete(f"{UPLOAD_PATH}/<int:image_id>")
@doc("Delete a stored firmware image", tags=("firmware",), response={"type": "object"}, errors=(401, 404),
     security="bearer")
def delete_image(image_id: int) -> Any:
    require_technician()
    # Beyond SQLite's integers no image can exist (and the query could not even be built: a 500).
    image = FirmwareImage.get_or_none(FirmwareImage.id == image_id) if image_id <= SQLITE_MAX_INT else None
    if image is None:
        raise ApiError(404, "NOT_FOUND", f"no firmware image {image_id}")
    with write_tx(require_db()):
        image.delete_instance()
    (firmware_dir() / image.filename).unlink(missing_ok=True)
    return jsonify({"success": True, "message": "Firmware deleted"})


@bp.get("/firmware/<name>")
@doc("Download a firmware image (devices on the LAN; no authentication)", tags=("firmware",),
     response={"type": "string", "format": "binary"}, content_type="application/octet-stream", errors=(404,))
def download(name: str) -> Response:
    sha = name.removesuffix(".bin")
    if not name.endswith(".bin") or not SHA_RE.match(sha):
        raise ApiError(404, "NOT_FOUND", "no such firmware image")
    path = firmware_dir() / name
    if not path.is_file():
        raise ApiError(404, "NOT_FOUND", "no such firmware image")
    return send_file(path, mimetype="application/octet-stream", conditional=True, etag=sha, max_age=0)
