"""Getting the Kermany chest X-ray data onto disk.

:func:`download_kermany` fetches ``ChestXRay2017.zip`` from Mendeley Data (resumable, verified)
and unpacks it into ``DEST/chest_xray/{train,test}/{NORMAL,PNEUMONIA}``. Checking a data folder
before training is :mod:`pneumoscope.data.audit`.

Source: Kermany D, Zhang K, Goldbaum M (2018). "Labeled Optical Coherence Tomography (OCT) and
Chest X-Ray Images for Classification", Mendeley Data, v2, doi:10.17632/rscbjbr9sj.2. CC BY 4.0.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from pneumoscope import CLASS_NAMES, __version__
from pneumoscope.data.decode import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

ZIP_NAME = "ChestXRay2017.zip"
DATA_DIRNAME = "chest_xray"

# Best-supported candidate, not fetched from here (no internet while writing this): Mendeley's
# "file_downloaded" endpoint for ChestXRay2017.zip in dataset rscbjbr9sj v2, which redirects to
# the storage host (urllib follows redirects). Many public download scripts use this exact
# address, e.g. github.com/Gregz9/CNN_vs_Weak (downloadData.sh); older ones use the form
# https://data.mendeley.com/datasets/rscbjbr9sj/2/files/41d542e7-.../ChestXRay2017.zip?dl=1.
# Override with url= or the PNEUMOSCOPE_DATA_URL environment variable.
DEFAULT_URL = (
    "https://data.mendeley.com/public-files/datasets/rscbjbr9sj/files/"
    "f12eaf6d-6023-432f-acc9-80c9d7393433/file_downloaded"
)
URL_ENV_VAR = "PNEUMOSCOPE_DATA_URL"
"""Environment variable that replaces :data:`DEFAULT_URL` (a mirror, a local copy)."""

# Size and SHA-256 of ChestXRay2017.zip as published by public projects that downloaded it from
# the URL above (download scripts and a dataset datasheet, which agree); None skips a check.
KERMANY_ZIP_SIZE = 1_235_512_464
KERMANY_ZIP_SHA256 = "13efc055629733dbab07877f8b3c9f81097840dbcdaa326a8542322c2281ce36"

MENDELEY_PAGE = "https://data.mendeley.com/datasets/rscbjbr9sj/2"
KAGGLE_PAGE = "https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia"

CONNECT_TIMEOUT = 10.0
"""Upper bound (seconds) on name lookup + TCP connect, so 'no network' fails fast."""

_CHUNK = 1 << 20

MAX_UNCOMPRESSED_BYTES = 8 * 2**30
"""Largest total size the data members of a zip may unpack to (the release unpacks to about
1.2 GB): a zip bomb is refused before anything is written. ``zipfile`` stops each member at
its declared size, so the declared sizes bound what is written."""
_SPLITS_IN_ZIP = ("train", "val", "test")  # the Mendeley zip has no val/, the Kaggle copy has
_REQUIRED_SPLITS = ("train", "test")

OFFLINE_HINT = (
    f"To proceed offline: download {ZIP_NAME} by hand from Mendeley Data ({MENDELEY_PAGE}, "
    'doi:10.17632/rscbjbr9sj.2) or the Kaggle copy "paultimothymooney/chest-xray-pneumonia" '
    f"({KAGGLE_PAGE}), extract it, and pass the extracted folder (the one holding train/ and "
    "test/) with --data PATH. Or put the zip itself in the destination folder and run again."
)


class DownloadError(RuntimeError):
    """Getting or unpacking the dataset failed; the message says why and how to go on offline."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"Dataset download failed: {detail}\n{OFFLINE_HINT}")
        self.detail = detail


class ChecksumError(DownloadError):
    """The downloaded file does not have the expected size or SHA-256 (it has been deleted)."""


class ArchiveError(DownloadError):
    """The zip is corrupt, unsafe (absolute or ``..`` member paths) or lacks train/ and test/."""


# --------------------------------------------------------------------------------------------
# download


def download_kermany(
    dest: str | Path,
    *,
    url: str = DEFAULT_URL,
    expected_size: int | None = KERMANY_ZIP_SIZE,
    sha256: str | None = KERMANY_ZIP_SHA256,
    timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """Download and unpack the Kermany chest X-ray zip into ``dest``; return ``dest/chest_xray``.

    Idempotent: a complete ``dest/chest_xray`` is returned without any request, and a
    ``dest/ChestXRay2017.zip`` already present is verified and unpacked without downloading.
    An interrupted download resumes from ``dest/ChestXRay2017.zip.part`` (HTTP Range).
    ``url`` defaults to the Mendeley file; the environment variable ``PNEUMOSCOPE_DATA_URL``
    replaces the default (an explicit ``url`` wins). ``expected_size``/``sha256`` default to the
    published zip's; pass ``None`` to skip a check (e.g. for a repacked mirror). ``timeout`` is
    the per-read socket timeout in seconds.

    Raises :class:`DownloadError` (network/HTTP failures), :class:`ChecksumError` (size or hash
    mismatch; the bad file is deleted) and :class:`ArchiveError` (corrupt or unsafe zip).
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    if expected_size is not None and expected_size <= 0:
        raise ValueError(f"expected_size must be positive or None, got {expected_size!r}")
    if url == DEFAULT_URL:
        url = os.environ.get(URL_ENV_VAR) or url

    dest = Path(dest)
    root = dest / DATA_DIRNAME
    if _is_complete(root):
        log.info("dataset already present at %s; nothing to download", root)
        return root
    if root.exists():
        raise DownloadError(
            f"{root} exists but is incomplete (it needs train/ and test/, each with non-empty "
            "NORMAL/ and PNEUMONIA/ folders); remove it or choose another destination"
        )
    dest.mkdir(parents=True, exist_ok=True)
    zip_path = dest / ZIP_NAME

    if zip_path.exists():
        try:
            _verify(zip_path, expected_size, sha256, progress)
            log.info("using the zip already at %s", zip_path)
        except ChecksumError as exc:
            log.warning("%s; downloading it again", exc.detail)
    if not zip_path.exists():
        part = zip_path.with_name(ZIP_NAME + ".part")
        _fetch(url, part, expected_size=expected_size, timeout=timeout, progress=progress)
        part.replace(zip_path)
        _verify(zip_path, expected_size, sha256, progress)

    _extract(zip_path, root, progress)
    log.info("dataset ready at %s", root)
    return root


def _is_complete(root: Path) -> bool:
    """True when ``root/{train,test}/{NORMAL,PNEUMONIA}`` all exist and hold an image."""
    for split in _REQUIRED_SPLITS:
        for name in CLASS_NAMES:
            folder = root / split / name
            if not folder.is_dir() or not any(
                p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()
            ):
                return False
    return True


def _preflight(url: str, timeout: float) -> None:
    """Resolve and connect to the server (or the proxy urllib will use) within a hard bound.

    ``urlopen``'s timeout does not cover the DNS lookup, which can hang for a long time on a
    machine without network; doing lookup + connect in a daemon thread bounds both.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DownloadError(f"unsupported URL {url!r} (need an http:// or https:// address)")
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if proxy_parts.hostname:
            host, port = proxy_parts.hostname, proxy_parts.port or 80

    errors: list[OSError] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as exc:
            errors.append(exc)

    thread = threading.Thread(target=attempt, name="pneumoscope-preflight", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if thread.is_alive():
        raise DownloadError(f"no answer from {host}:{port} within {timeout:g} s (offline?)")
    if errors:
        exc = errors[0]
        kind = "cannot resolve" if isinstance(exc, socket.gaierror) else "cannot connect to"
        raise DownloadError(f"{kind} {host}:{port} ({exc})")


def _content_range_total(header: str | None) -> int | None:
    """Total size from a ``Content-Range: bytes a-b/total`` (or ``bytes */total``) header."""
    m = re.fullmatch(r"\s*bytes\s+(?:\d+-\d+|\*)/(\d+)\s*", header or "")
    return int(m.group(1)) if m else None


def _fetch(
    url: str, part: Path, *, expected_size: int | None, timeout: float, progress: bool
) -> None:
    """Download ``url`` into ``part``, resuming what is there; leave it complete or raise."""
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        log.warning("%s is larger than the expected %d bytes; starting over", part, expected_size)
        part.unlink()
        offset = 0
    if expected_size is not None and offset == expected_size:
        return  # a previous run got every byte but stopped before the rename

    _preflight(url, min(timeout, CONNECT_TIMEOUT))
    headers = {"User-Agent": f"pneumoscope/{__version__} (+urllib)"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            if _content_range_total(exc.headers.get("Content-Range")) == offset:
                return  # the .part already holds the whole file
            # The partial file does not fit the file this server has: start over once.
            log.warning("server refused to resume %s (HTTP 416); starting over", part)
            part.unlink()
            return _fetch(
                url, part, expected_size=expected_size, timeout=timeout, progress=progress
            )
        raise DownloadError(f"HTTP {exc.code} {exc.reason} from {url}") from exc
    except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets
        reason = getattr(exc, "reason", None) or exc
        raise DownloadError(f"cannot download {url} ({reason})") from exc

    with response:
        status = response.status
        length = response.headers.get("Content-Length")
        length_n = int(length) if length and length.isdigit() else None
        if status == 206:
            start = re.match(r"\s*bytes\s+(\d+)-", response.headers.get("Content-Range", ""))
            if not start or int(start.group(1)) != offset:
                raise DownloadError(
                    f"server answered a resume request from byte {offset} with "
                    f"Content-Range {response.headers.get('Content-Range')!r}; delete {part} "
                    "and run again"
                )
            total = _content_range_total(response.headers.get("Content-Range"))
            log.info("resuming %s at byte %d", part.name, offset)
        elif status == 200:
            if response.headers.get_content_type() == "text/html":
                # Data hosts answer a login, cookie or bot-check page with 200 instead of the file.
                raise DownloadError(
                    f"{url} returned an HTML page instead of {ZIP_NAME} (a login or bot-check "
                    "page?); open it in a browser"
                )
            if offset:
                log.info("server ignored the Range request; restarting %s from zero", part.name)
            offset = 0
            total = length_n
        else:
            raise DownloadError(f"unexpected HTTP {status} {response.reason} from {url}")

        if total is not None and expected_size is not None and total != expected_size:
            part.unlink(missing_ok=True)
            raise ChecksumError(
                f"{url} serves {total} bytes but {ZIP_NAME} should be {expected_size} bytes "
                "(a different file?); pass expected_size=None and sha256=None to accept it"
            )
        _stream(response, part, offset=offset, total=total, url=url, progress=progress)


def _stream(
    response: http.client.HTTPResponse,
    part: Path,
    *,
    offset: int,
    total: int | None,
    url: str,
    progress: bool,
) -> None:
    """Copy the response body to ``part`` (appending at ``offset``) with a byte progress bar."""
    received = offset
    with (
        open(part, "ab" if offset else "wb") as fh,
        tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=ZIP_NAME,
            disable=not progress,
        ) as bar,
    ):
        while True:
            try:
                chunk = response.read(_CHUNK)
            except (OSError, http.client.HTTPException) as exc:  # timeout, reset, IncompleteRead
                raise DownloadError(
                    f"connection to {url} lost after {received} bytes "
                    f"({type(exc).__name__}: {exc}); run again to resume"
                ) from exc
            if not chunk:
                break
            fh.write(chunk)  # a write error (disk full) propagates as itself, not as 'network'
            received += len(chunk)
            bar.update(len(chunk))
    if total is not None and received != total:
        raise DownloadError(
            f"download from {url} stopped after {received} of {total} bytes; run again to resume"
        )


def _sha256_file(path: Path, progress: bool) -> str:
    digest = hashlib.sha256()
    with (
        open(path, "rb") as fh,
        tqdm(
            total=path.stat().st_size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="sha256",
            disable=not progress,
        ) as bar,
    ):
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _verify(path: Path, expected_size: int | None, sha256: str | None, progress: bool) -> None:
    """Check size then hash; on mismatch delete ``path`` and raise :class:`ChecksumError`."""
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        path.unlink()
        raise ChecksumError(
            f"{path} has {size} bytes, expected {expected_size}; deleted it. Run again, or pass "
            "expected_size=None and sha256=None if you deliberately use a different archive"
        )
    if sha256 is not None:
        actual = _sha256_file(path, progress)
        if actual != sha256.lower():
            path.unlink()
            raise ChecksumError(
                f"{path} has sha256 {actual}, expected {sha256.lower()}; deleted it. Run again, "
                "or pass sha256=None if you deliberately use a different archive"
            )


# --------------------------------------------------------------------------------------------
# extraction


def _member_parts(name: str) -> tuple[str, ...]:
    """Path parts of a zip member name; raise :class:`ArchiveError` for unsafe names."""
    posix = name.replace("\\", "/")  # zips written on Windows may use backslashes
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        raise ArchiveError(f"refusing unsafe archive member {name!r} (absolute path)")
    parts = tuple(p for p in PurePosixPath(posix).parts if p not in ("", "."))
    if ".." in parts:
        raise ArchiveError(f"refusing unsafe archive member {name!r} ('..' in its path)")
    return parts


def _is_junk(parts: tuple[str, ...]) -> bool:
    """macOS resource forks (``__MACOSX/``, ``._x``) and dotfiles such as ``.DS_Store``."""
    return any(p == "__MACOSX" or p.startswith(".") for p in parts)


def _find_data_prefix(names: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    """The shallowest folder of the zip that holds both ``train/`` and ``test/``."""
    seen: dict[tuple[str, ...], set[str]] = defaultdict(set)
    for parts in names:
        for i, part in enumerate(parts[:-1]):
            if part.lower() in _SPLITS_IN_ZIP:
                seen[parts[:i]].add(part.lower())
    candidates = [p for p, splits in seen.items() if set(_REQUIRED_SPLITS) <= splits]
    if not candidates:
        raise ArchiveError("the zip has no folder with both train/ and test/ inside")
    return min(candidates, key=lambda p: (len(p), p))


def _check_targets(wanted: list[tuple[zipfile.ZipInfo, tuple[str, ...]]], max_bytes: int) -> None:
    """Refuse, before anything is written, an archive whose members would overwrite each other
    (names equal but for case, on a case-insensitive disk or for the lower-cased split folder),
    clash as a file and a folder of the same name, or unpack to more than ``max_bytes``."""
    total = sum(info.file_size for info, _ in wanted)
    if total > max_bytes:
        raise ArchiveError(f"the data members unpack to {total} bytes, above the limit of {max_bytes} "
                           "(a zip bomb?)")
    seen: dict[tuple[str, ...], str] = {}
    for info, rel in wanted:
        key = tuple(part.casefold() for part in rel)
        if key in seen:
            raise ArchiveError(f"members {seen[key]!r} and {info.filename!r} differ only in case "
                               "(or are the same name twice): one would overwrite the other")
        seen[key] = info.filename
    folders = {key[:i]: name for key, name in seen.items() for i in range(1, len(key))}
    clash = next((key for key in seen if key in folders), None)
    if clash is not None:
        raise ArchiveError(f"{seen[clash]!r} is a file, and a folder in {folders[clash]!r}: "
                           "the archive cannot be unpacked")


def _extract(zip_path: Path, root: Path, progress: bool, max_bytes: int | None = None) -> None:
    """Unpack the train/val/test folders of ``zip_path`` into ``root`` (all or nothing).
    ``max_bytes``: default :data:`MAX_UNCOMPRESSED_BYTES`."""
    staging = root.with_name(f".{root.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)  # left over from an interrupted extraction of ours
    try:
        with zipfile.ZipFile(zip_path) as zf:
            # Validate every member before writing anything: one bad name refuses the archive.
            members = [(info, _member_parts(info.filename)) for info in zf.infolist()]
            files = [(i, p) for i, p in members if not i.is_dir() and p and not _is_junk(p)]
            prefix = _find_data_prefix(p for _, p in files)
            n = len(prefix)
            wanted = [
                (info, parts[n:])
                for info, parts in files
                if parts[:n] == prefix and len(parts) > n + 1 and parts[n].lower() in _SPLITS_IN_ZIP
            ]
            _check_targets([(info, (rel[0].lower(), *rel[1:])) for info, rel in wanted],
                           MAX_UNCOMPRESSED_BYTES if max_bytes is None else max_bytes)
            log.info("extracting %d files from %s", len(wanted), zip_path)
            for info, rel in tqdm(wanted, desc="extract", unit="file", disable=not progress):
                target = staging.joinpath(rel[0].lower(), *rel[1:])
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
    except ArchiveError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ArchiveError(f"{zip_path}: {exc.detail}") from None
    except zipfile.BadZipFile as exc:
        shutil.rmtree(staging, ignore_errors=True)
        zip_path.unlink(missing_ok=True)
        raise ArchiveError(f"{zip_path} is not a valid zip ({exc}); deleted it") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not _is_complete(staging):
        shutil.rmtree(staging, ignore_errors=True)
        raise ArchiveError(
            f"{zip_path} lacks train/ or test/ images for both {' and '.join(CLASS_NAMES)}"
        )
    staging.replace(root)  # atomic: a half-extracted tree never looks complete
