"""Download, cache and verify the published MedSAM ViT-B weights.

Sources:

* Hugging Face ``wanglab/medsam-vit-base`` (transformers ``SamModel`` layout, ``model.safetensors``):
  downloaded automatically; ``model.py`` converts its keys to segment-anything's layout.
* The authors' Google Drive folder (``medsam_vit_b.pth``): Drive cannot be fetched with a plain HTTP
  GET, so it is the manual route: download it in a browser and pass ``--checkpoint FILE`` (or put it
  in the cache folder as ``medsam_vit_b.pth``).

Integrity: the authors publish no checksum. A file is checked against ``PINNED_SHA256`` when a digest
is pinned for its name; otherwise the digest of the first complete download is recorded next to it in
``<name>.sha256`` (trust on first use) and every later use checks the file against that record. When a
server advertises an LFS SHA-256 (Hugging Face's ``X-Linked-Etag``), the download is checked against it
as well.

Downloads stream into ``<name>.part`` (resumed with an HTTP Range request after an interruption, kept
with a ``<name>.part.json`` note of the URL, validator and size) and only a verified file is moved to
the final name with ``os.replace``; nothing is ever written at the final name directly.

Nothing here imports torch, Slicer or Qt; ``requests`` and ``tqdm`` are imported when downloading.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from typing import Callable, Dict, Optional, Tuple
from urllib.parse import urlparse

from .errors import InputError, WeightsError

HF_PAGE = "https://huggingface.co/wanglab/medsam-vit-base"
DEFAULT_URL = HF_PAGE + "/resolve/main/model.safetensors"
DRIVE_FOLDER = "https://drive.google.com/drive/folders/1ETWmi4AiniJeWOt6HAsYgTjYv_fkgzoN"

DEFAULT_FILENAME = "medsam_vit_b.safetensors"  # where DEFAULT_URL lands in the cache
# The same repository may serve the PyTorch file instead (which names it serves on main cannot be
# confirmed from every network): models/medsam.py tries BIN_URL when DEFAULT_URL is not found.
BIN_URL = HF_PAGE + "/resolve/main/pytorch_model.bin"
BIN_FILENAME = "medsam_vit_b.bin"
MANUAL_FILENAME = "medsam_vit_b.pth"  # the authors' file, if a user puts it in the cache by hand
CACHE_ENV = "MEDSAM_SLICER_CACHE"
APP_NAME = "medsam-slicer"

# File name -> SHA-256 hex digest. None: unknown (the authors publish none), so trust on first use.
PINNED_SHA256: Dict[str, Optional[str]] = {
    DEFAULT_FILENAME: None,
    MANUAL_FILENAME: None,
    BIN_FILENAME: None,
}

PART_SUFFIX = ".part"
META_SUFFIX = ".part.json"
DIGEST_SUFFIX = ".sha256"
CHUNK_SIZE = 1 << 20
DEFAULT_TIMEOUT = 30.0  # seconds: to connect, and between two reads of the body
_MAX_ATTEMPTS = 3  # restarts after a stale or inconsistent .part file

ProgressCallback = Callable[[int, Optional[int]], None]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


def manual_instructions() -> str:
    return (
        f"download {MANUAL_FILENAME} by hand from {DRIVE_FOLDER} (or model.safetensors from {HF_PAGE}) "
        "and pass --checkpoint FILE"
    )


# ----------------------------------------------------------------------------------------------- paths


def cache_dir(cache: Optional[str] = None) -> str:
    """The per-user cache folder: ``cache`` if given, else $MEDSAM_SLICER_CACHE, else platformdirs'.

    The folder is not created here (``download`` creates it).
    """
    if cache is None or str(cache).strip() == "":
        cache = os.environ.get(CACHE_ENV, "").strip() or None
    if cache is None:
        from platformdirs import user_cache_dir

        cache = user_cache_dir(APP_NAME)
    return os.path.abspath(os.path.expanduser(str(cache)))


def default_weights_path(cache: Optional[str] = None) -> str:
    """Where ``download()`` of the default source lands."""
    return os.path.join(cache_dir(cache), DEFAULT_FILENAME)


def cached_weights(cache: Optional[str] = None) -> Optional[str]:
    """The weights already in the cache folder (downloaded, or the authors' .pth put there), if any."""
    folder = cache_dir(cache)
    for name in (DEFAULT_FILENAME, BIN_FILENAME, MANUAL_FILENAME):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def digest_sidecar(path: str) -> str:
    return str(path) + DIGEST_SUFFIX


# ---------------------------------------------------------------------------------------------- digests


def sha256_file(path: str, chunk_size: int = CHUNK_SIZE) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(chunk_size), b""):
                digest.update(block)
    except FileNotFoundError:
        raise WeightsError(f"weights file {path}: no such file") from None
    except OSError as exc:
        raise WeightsError(f"weights file {path} cannot be read: {exc.strerror or exc}") from None
    return digest.hexdigest()


def _normalize_digest(value: Optional[str], what: str = "expected SHA-256") -> Optional[str]:
    if value is None:
        return None
    text = str(value).strip().lower()
    if text.startswith("sha256:"):
        text = text[len("sha256:"):]
    if not _HEX64.match(text):
        raise InputError(f"{what} must be 64 hexadecimal digits, got '{str(value)[:80]}'")
    return text


def pinned_sha256(path: str) -> Optional[str]:
    """The pinned digest for this file's name, if one is known."""
    return _normalize_digest(PINNED_SHA256.get(os.path.basename(str(path))), "pinned SHA-256")


def recorded_sha256(path: str) -> Optional[str]:
    """The digest recorded next to the file on first use, if any (a corrupt record is an error)."""
    sidecar = digest_sidecar(path)
    try:
        with open(sidecar, encoding="ascii", errors="replace") as handle:
            text = handle.read(4096)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise WeightsError(f"digest record {sidecar} cannot be read: {exc.strerror or exc}") from None
    token = text.split()[0] if text.split() else ""
    if not _HEX64.match(token.lower()):
        raise WeightsError(f"digest record {sidecar} is damaged; delete it to record the file's digest again")
    return token.lower()


def record_sha256(path: str, digest: str) -> str:
    """Writes ``<path>.sha256`` (sha256sum format) atomically; returns the sidecar's path."""
    digest = _normalize_digest(digest)
    sidecar = digest_sidecar(path)
    tmp = sidecar + ".tmp"
    try:
        with open(tmp, "w", encoding="ascii") as handle:
            handle.write(f"{digest}  {os.path.basename(str(path))}\n")
        os.replace(tmp, sidecar)
    except OSError as exc:
        _remove(tmp)
        raise WeightsError(f"cannot write the digest record {sidecar}: {exc.strerror or exc}") from None
    return sidecar


def _expected_digest(path: str, explicit: Optional[str]) -> Tuple[Optional[str], str]:
    """(digest, where it comes from): explicit argument, then pinned, then recorded on first use."""
    explicit = _normalize_digest(explicit)
    if explicit:
        return explicit, "expected"
    pinned = pinned_sha256(path)
    if pinned:
        return pinned, "pinned"
    recorded = recorded_sha256(path)
    if recorded:
        return recorded, "recorded"
    return None, ""


def _mismatch_message(path: str, source: str, expected: str, actual: str) -> str:
    hint = ""
    if source == "recorded":
        hint = f" (if the publisher replaced the file on purpose, delete {digest_sidecar(path)} to accept the new one)"
    return (
        f"{os.path.basename(str(path))} does not match its {source} SHA-256 "
        f"(expected {expected[:16]}..., got {actual[:16]}...): the file is corrupted or was altered{hint}"
    )


def verify(path: str, expected_sha256: Optional[str] = None) -> str:
    """Checks a weights file and returns its SHA-256.

    Against ``expected_sha256`` if given, else the pinned digest for its name, else the digest recorded
    in ``<path>.sha256``; with none of these, the file's digest is recorded now (trust on first use).
    Raises WeightsError when the file is missing or does not match. The file is never deleted here.
    """
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path} is missing")
    expected, source = _expected_digest(path, expected_sha256)
    actual = sha256_file(path)
    if expected is None:
        record_sha256(path, actual)
        return actual
    if actual != expected:
        raise WeightsError(_mismatch_message(path, source, expected, actual))
    return actual


# --------------------------------------------------------------------------------------------- download


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _network_error(url: str, reason: str) -> WeightsError:
    return WeightsError(
        f"could not download the MedSAM weights from {url}: {_one_line(reason)}; {manual_instructions()}"
    )


def _describe_exception(exc: BaseException) -> str:
    import requests

    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "connection timed out (offline?)"
    if isinstance(exc, requests.exceptions.Timeout):
        return "the server stopped sending data (timed out)"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "the connection was cut during the download (run again to resume)"
    if isinstance(exc, requests.exceptions.ConnectionError):
        text = str(exc)
        if "timed out" in text.lower():  # a read timeout inside iter_content arrives as ConnectionError
            return "the server stopped sending data (timed out)"
        if "refused" in text.lower():
            return "connection refused"
        if "name resolution" in text.lower() or "getaddrinfo" in text.lower() or "nodename" in text.lower():
            return "the host name cannot be resolved (offline?)"
        return f"connection failed ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"


def _check_url(url: str) -> None:
    parsed = urlparse(str(url))
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise InputError(f"weights URL must be an http(s) address, got '{_one_line(url, 120)}'")


def _resolve_dest(url: str, dest: Optional[str], cache: Optional[str]) -> str:
    if url == DEFAULT_URL:
        name = DEFAULT_FILENAME
    else:
        name = os.path.basename(urlparse(url).path) or DEFAULT_FILENAME
    if dest is None:
        return os.path.join(cache_dir(cache), name)
    dest = os.path.abspath(os.path.expanduser(str(dest)))
    if os.path.isdir(dest):
        return os.path.join(dest, name)
    return dest


def _read_meta(meta_path: str) -> Optional[dict]:
    try:
        with open(meta_path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _write_meta(meta_path: str, meta: dict) -> None:
    tmp = meta_path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(meta, handle)
        os.replace(tmp, meta_path)
    except OSError as exc:
        _remove(tmp)
        raise WeightsError(f"cannot write {meta_path}: {exc.strerror or exc}") from None


def _discard_partial(part: str, meta_path: str) -> None:
    _remove(part)
    _remove(meta_path)


def _resume_state(part: str, meta_path: str, url: str) -> Tuple[int, dict]:
    """(bytes already downloaded, note) for a .part file that belongs to this URL; else (0, {})."""
    if not os.path.isfile(part):
        _remove(meta_path)
        return 0, {}
    meta = _read_meta(meta_path)
    size = os.path.getsize(part)
    total = meta.get("total") if meta else None
    if not meta or meta.get("url") != url or size == 0 or (isinstance(total, int) and size > total):
        _discard_partial(part, meta_path)  # not ours, empty, or longer than the file: start over
        return 0, {}
    return size, meta


def _parse_content_range(value: Optional[str]) -> Tuple[Optional[int], Optional[int]]:
    match = _CONTENT_RANGE.match(value or "")
    if not match:
        return None, None
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), total


def _validator(headers) -> Optional[str]:
    """A value usable in If-Range: a strong ETag, else Last-Modified."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified") or None


def _advertised_sha256(response) -> Optional[str]:
    """The SHA-256 a server announces for an LFS file (Hugging Face: X-Linked-Etag on the redirect)."""
    for resp in list(getattr(response, "history", []) or []) + [response]:
        for header in ("X-Linked-Etag", "X-Linked-ETag"):
            value = resp.headers.get(header)
            if value:
                token = value.strip().strip('"').lower()
                if _HEX64.match(token):
                    return token
    return None


def _check_space(folder: str, needed: Optional[int]) -> None:
    if not needed:
        return
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < needed:
        raise WeightsError(
            f"not enough disk space in {folder}: the weights need {needed / 1e6:.0f} MB more, "
            f"{free / 1e6:.0f} MB are free"
        )


def _hash_existing(part: str, size: int):
    digest = hashlib.sha256()
    with open(part, "rb") as handle:
        remaining = size
        while remaining > 0:
            block = handle.read(min(CHUNK_SIZE, remaining))
            if not block:
                break
            digest.update(block)
            remaining -= len(block)
    return digest


def _finalize(part: str, meta_path: str, dest: str, actual: str, expected: Optional[str], source: str,
              advertised: Optional[str]) -> str:
    for wanted, origin in ((expected, source), (advertised, "server-advertised")):
        if wanted and actual != wanted:
            _discard_partial(part, meta_path)
            raise WeightsError(
                "download failed verification: " + _mismatch_message(dest, origin, wanted, actual)
                + "; the bad download was deleted"
            )
    record_sha256(dest, actual)  # first complete download: trust on first use from now on
    try:
        os.replace(part, dest)
    except OSError as exc:
        raise WeightsError(f"cannot move the download to {dest}: {exc.strerror or exc}") from None
    _remove(meta_path)
    return dest


def download(
    url: str = DEFAULT_URL,
    dest: Optional[str] = None,
    expected_sha256: Optional[str] = None,
    progress: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    progress_callback: Optional[ProgressCallback] = None,
    cache: Optional[str] = None,
) -> str:
    """Downloads the weights and returns the final path (``dest``, a folder, or the cache by default).

    Streams into ``<dest>.part``, resuming it with a Range request when it belongs to the same URL
    (starting over when the server answers the whole file), checks the SHA-256 (``expected_sha256``,
    else the pinned digest, else the one recorded by an earlier download, plus any digest the server
    advertises), records it in ``<dest>.sha256`` and moves the file into place atomically.

    ``progress`` shows a tqdm bar on stderr; ``progress_callback(done_bytes, total_bytes_or_None)`` is
    called as data arrives (an exception raised by it stops the download and keeps the .part file).
    Network and HTTP failures raise WeightsError naming the manual route; the .part file is kept for
    resuming, and nothing is ever left at the final name.
    """
    import requests

    from . import __version__

    _check_url(url)
    dest = _resolve_dest(url, dest, cache)
    folder = os.path.dirname(dest)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise WeightsError(f"cannot create the weights folder {folder}: {exc.strerror or exc}") from None
    expected, source = _expected_digest(dest, expected_sha256)
    part, meta_path = dest + PART_SUFFIX, dest + META_SUFFIX
    name = os.path.basename(dest)

    session = requests.Session()
    session.headers["User-Agent"] = f"medsam-slicer/{__version__}"
    try:
        restarts = 0
        while True:
            if restarts >= _MAX_ATTEMPTS:
                raise _network_error(url, "the server's answers to a resumed download were inconsistent")
            offset, meta = _resume_state(part, meta_path, url)
            if offset and meta.get("total") == offset:  # complete but never moved into place
                return _finalize(part, meta_path, dest, _hash_existing(part, offset).hexdigest(),
                                 expected, source, meta.get("sha256"))
            headers = {"Accept-Encoding": "identity"}
            if offset:
                headers["Range"] = f"bytes={offset}-"
                if meta.get("validator"):
                    headers["If-Range"] = meta["validator"]
            try:
                response = session.get(url, headers=headers, stream=True, timeout=(timeout, timeout))
            except requests.RequestException as exc:
                raise _network_error(url, _describe_exception(exc)) from None
            with response:
                status = response.status_code
                if status == 416 and offset:  # our .part is not a prefix the server recognises
                    _discard_partial(part, meta_path)
                    restarts += 1
                    continue
                if status not in (200, 206):
                    reason = f"HTTP {status} {response.reason or ''}".strip()
                    raise _network_error(url, reason)
                if status == 206:
                    start, total = _parse_content_range(response.headers.get("Content-Range"))
                    if start is None or start != offset:
                        _discard_partial(part, meta_path)
                        restarts += 1
                        continue
                else:  # 200: the whole file (a fresh download, or a server that ignores Range)
                    offset = 0
                    length = response.headers.get("Content-Length", "")
                    total = int(length) if length.isdigit() else None
                advertised = _advertised_sha256(response) or (meta.get("sha256") if offset else None)
                _write_meta(meta_path, {"url": url, "validator": _validator(response.headers),
                                        "total": total, "sha256": advertised})
                _check_space(folder, (total - offset) if total else None)
                digest = _hash_existing(part, offset) if offset else hashlib.sha256()
                done = _stream(response, part, offset, total, digest, name, progress, progress_callback, url)
                if total is not None and done != total:
                    if status == 206 and offset < done < total:
                        continue  # the server sent a shorter range than asked for: ask for the rest
                    raise _network_error(url, f"the connection ended after {done} of {total} bytes (run again to resume)")
                return _finalize(part, meta_path, dest, digest.hexdigest(), expected, source, advertised)
    finally:
        session.close()


def _stream(response, part: str, offset: int, total: Optional[int], digest, name: str, progress: bool,
            progress_callback: Optional[ProgressCallback], url: str) -> int:
    """Appends the body to the .part file (truncating it when offset is 0); returns its new size."""
    import requests
    from tqdm import tqdm

    done = offset
    bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
               file=sys.stderr, disable=(not progress) or sys.stderr is None, leave=True)
    try:
        try:
            handle = open(part, "ab" if offset else "wb")
        except OSError as exc:
            raise WeightsError(f"cannot write {part}: {exc.strerror or exc}") from None
        with handle:
            if progress_callback is not None:
                progress_callback(done, total)
            try:
                for block in response.iter_content(chunk_size=CHUNK_SIZE):
                    if not block:
                        continue
                    try:
                        handle.write(block)
                    except OSError as exc:
                        raise WeightsError(f"cannot write {part}: {exc.strerror or exc}") from None
                    digest.update(block)
                    done += len(block)
                    bar.update(len(block))
                    if progress_callback is not None:
                        progress_callback(done, total)
            except requests.RequestException as exc:
                handle.flush()
                raise _network_error(url, _describe_exception(exc)) from None
    finally:
        bar.close()
    return done


# ------------------------------------------------------------------------------------------------ entry


def ensure_weights(
    checkpoint: Optional[str] = None,
    download_if_missing: bool = True,
    progress: bool = True,
    cache: Optional[str] = None,
    url: str = DEFAULT_URL,
    progress_callback: Optional[ProgressCallback] = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """The weights file to load.

    ``checkpoint`` given: that file (InputError when it does not exist; it is not digest-checked).
    Otherwise the cached weights, verified (a cached file that fails verification is deleted and
    reported), else a fresh download unless ``download_if_missing`` is False.
    """
    if checkpoint is not None and str(checkpoint).strip():
        path = os.path.abspath(os.path.expanduser(str(checkpoint)))
        if not os.path.isfile(path):
            raise InputError(f"checkpoint {checkpoint}: no such file")
        return path
    target = _resolve_dest(url, None, cache)
    path = target if os.path.isfile(target) else (cached_weights(cache) if url == DEFAULT_URL else None)
    if path is not None:
        try:
            verify(path)
        except WeightsError as exc:
            _remove(path)
            raise WeightsError(f"{exc}; deleted {path}, run again to download a fresh copy") from None
        return path
    if not download_if_missing:
        raise WeightsError(f"no MedSAM weights in {cache_dir(cache)} and downloading is off; {manual_instructions()}")
    return download(url=url, dest=target, progress=progress, timeout=timeout, progress_callback=progress_callback)
