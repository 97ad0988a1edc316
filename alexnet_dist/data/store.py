"""Where shards and their files live: a local path, s3://bucket/key (AWS S3 or any S3-compatible
store: MinIO, Ceph, ...) or http(s)://host/path. Everything that reads shards, manifests and index
files opens them through `open_file`, so each reader works the same from every place.

A remote file is read with ranged GET requests. A read that fails (a reset connection, a timeout,
a server that is gone or answers 5xx) is tried again from the byte it stopped at, after 0.5, 1, 2,
4 and 8 seconds; then one line names the file and what went wrong. Every request has a deadline
and a minimum rate (config.StoreLimits, set through ALEXNET_STORE_DEADLINE_S,
ALEXNET_STORE_MIN_RATE_KBS and ALEXNET_STORE_WAITS): connecting, and each wait for the next bytes,
within deadline_s (20 s), and a read of n bytes (at most one buffer, 1 MiB) within deadline_s +
n / min_rate (64 kB/s): a store that stalls or trickles fails the read like one that resets it.
So a store that goes away or slows to a trickle stops a run within seconds when it refuses
connections, within StoreLimits.bound when it stalls or trickles (at most about 8 minutes for a
1 MiB read at the defaults; 6 x 20 + 15.5 s for a store that stalls outright), never hangs it, and
a short outage costs nothing.

S3 credentials, region and endpoint come from the standard AWS environment variables and files
(AWS_ACCESS_KEY_ID, AWS_PROFILE, ~/.aws/config, AWS_ENDPOINT_URL for an S3-compatible store),
read by boto3 as every AWS tool reads them. An HTTP server's login comes from ~/.netrc, as curl
and wget read it. A location never carries a credential (a user name or password, a presigned
query, a token): locations are printed in error lines and stored in configs, manifests and
checkpoints, so the commands refuse such a location in one line (`credentials.credentials_in`), and
`credentials.redact` hides any that would still reach an error line.

alexnet-prepare writes through `Destination`: a local folder, or an s3:// prefix whose files are
made in a local staging folder and uploaded one by one as they are finished, under the same
retry policy (HTTP is read-only).
"""

import fnmatch
import hashlib
import http.client
import io
import multiprocessing
import netrc
import os
import re
import shutil
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from pathlib import Path

from braceexpand import braceexpand

from ..config import StoreLimits, make
from ..errors import ConfigError, DataError

SCHEMES = ("s3://", "http://", "https://")
_limits: StoreLimits | None = None


def limits() -> StoreLimits:
    """This process's StoreLimits: the defaults, or what the ALEXNET_STORE_* variables say (read
    once; loader workers inherit them); a bad value is one ConfigError line naming the variable."""
    global _limits
    if _limits is None:
        given = {}
        for key in ("deadline_s", "min_rate_kbs", "waits"):
            value = os.environ.get(f"ALEXNET_STORE_{key.upper()}")
            if value is not None:
                given[key] = [w for w in value.split(",") if w.strip()] if key == "waits" else value
        try:
            _limits = make(StoreLimits, given)
        except ConfigError as exc:  # its line names the field; the user set variables
            named = ", ".join(f"ALEXNET_STORE_{k.upper()}={os.environ[f'ALEXNET_STORE_{k.upper()}']}" for k in given)
            raise ConfigError(
                f"{named}: {str(exc).split('; ')[0]}; give numbers: seconds (the waits comma-separated), a rate in kB/s"
            ) from None
    return _limits


class Stopped(DataError):
    """Reading was given up because `stop` was set: another reader failed, the result is not wanted."""


class TooSlow(TimeoutError):
    """A read that took longer than its limit (a stalled or trickling store): a timeout, tried again."""


# Bytes received from remote stores (tars, index files, manifests; RemoteFile's reads and the bytes
# http_get skips), for the benchmark's "bytes fetched from the store". In shared memory: loader
# workers forked from this process add to the same count, so it holds the whole rank's.
_fetched = multiprocessing.Value("q", 0)


def fetched_bytes() -> int:
    """How many bytes this process and the workers forked from it have received from remote stores."""
    return _fetched.value


def count_fetched(n: int) -> None:
    with _fetched.get_lock():
        _fetched.value += n


def is_remote(location: str) -> bool:
    return str(location).startswith(SCHEMES)


def netrc_login(url: str) -> dict[str, str]:
    """The Authorization header ~/.netrc gives `url`'s host (its `machine` line, else its
    `default` line), as curl and wget read it; {} when the file or a line for the host is absent.
    A file others may read is refused only where it holds a login for this host: a public server
    needs nothing from it, whatever its permissions."""
    path = os.path.expanduser("~/.netrc")
    fix = "fix it: one line per server, machine HOST login USER password PASSWORD, readable by you alone (chmod 600)"
    try:
        # the path given: Python then skips its own owner and permission check, made below for this host only
        entry = netrc.netrc(path).authenticators(urllib.parse.urlsplit(url).hostname or "")
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return {}
    except OSError as exc:  # there but unreadable: not a failure of the store, so not tried again
        raise DataError(
            f"{exc.filename}: cannot be read ({exc.strerror}); make it readable by you (chmod 600)"
        ) from None
    except netrc.NetrcParseError as exc:  # a line it cannot read
        line = f" (line {exc.lineno})" if exc.lineno else ""
        raise DataError(f"{exc.filename or path}: {exc.msg}{line}; {fix}") from None
    if entry is None:
        return {}
    if mode & 0o077:
        raise DataError(
            f"{path}: ~/.netrc access too permissive: access permissions must restrict access to only the owner; {fix}"
        )
    login, _, password = entry
    return {"Authorization": "Basic " + b64encode(f"{login}:{password or ''}".encode()).decode()}


def join(root: str, name: str) -> str:
    """`name` (a path relative to `root`, or a location of its own) as a location."""
    if is_remote(name) or os.path.isabs(name):
        return name
    if is_remote(root):
        return root.rstrip("/") + "/" + name
    return str(Path(root) / name)


def split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket:
        raise DataError(f"{url}: no bucket named; S3 locations read s3://BUCKET/KEY")
    return bucket, key


_clients, _client_lock = {}, threading.Lock()


def s3_client():
    """This process's S3 client (one per process: clients are not safe to share across a fork;
    threads share it). botocore's own retries are off; `retrying` does them, the same for S3 and HTTP."""
    global _clients
    with _client_lock:
        if os.getpid() not in _clients:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise DataError(
                    "s3:// locations need boto3, which is not installed; pip install 'alexnet_dist[s3]'"
                ) from None
            wait = limits().deadline_s
            config = Config(retries={"max_attempts": 1}, connect_timeout=wait, read_timeout=wait)
            _clients = {os.getpid(): boto3.session.Session().client("s3", config=config)}
        return _clients[os.getpid()]


class Missing(DataError):
    """The file does not exist (HTTP 404, S3 NoSuchKey): not worth trying again."""


class Unreachable(DataError):
    """The store did not answer, or answered with a server error, through every try."""


class Transient(DataError):
    """A failure that may pass (a connection refused, reset or timed out, a server error): what
    `retry` tries again. `why` is what went wrong, for the line that ends the tries."""

    def __init__(self, message: str, why: str):
        super().__init__(message)
        self.why = why


def retry(
    location: str, attempt, failed: Transient | None = None, writing: bool = False, stop: threading.Event | None = None
):
    """The one retry policy for a store: attempt() until it returns; after a Transient failure
    again after each of StoreLimits.waits, any other error at once. `failed`: a first try, already
    made, that failed. When every try failed, Unreachable names `location` and the last failure's
    why. `stop`, once set, ends the tries (Stopped)."""
    started, tries, waits = time.monotonic(), 0, limits().waits
    stop = stop or threading.Event()
    while True:
        if failed is not None:
            tries += 1
            if tries > len(waits):
                again = "what was uploaded is kept" if writing else "a training run resumes from its last checkpoint"
                raise Unreachable(
                    f"{location}: cannot be {'written' if writing else 'read'} ({failed.why}) after {tries} tries "
                    f"over {time.monotonic() - started:.0f} s; check that the store is reachable, then run the same "
                    f"command again ({again})"
                )
            if stop.wait(waits[tries - 1]):
                raise Stopped(f"{location}: reading given up")
        try:
            return attempt()
        except Transient as exc:
            failed = exc


def failure(exc: Exception) -> tuple[str, bool]:
    """(why, worth trying again) for an error of a request: only what may pass (a connection refused,
    reset or timed out, a server error) is tried again; a refusal, bad settings or a bad URL are not."""
    try:
        from botocore import exceptions as boto
    except ImportError:  # without boto3 no S3 request was made
        boto = None
    if boto and isinstance(exc, boto.NoCredentialsError):
        return "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE", False
    if boto and isinstance(exc, boto.ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        why = f"{error.get('Code', status)}: {error.get('Message', '')}".strip(": ")
        if status == 403:
            why += "; S3 also answers 403 for a missing key when the credentials may not list the bucket"
        return why, status >= 500 or status == 429
    transient = (boto.ConnectionError, boto.HTTPClientError, boto.IncompleteReadError) if boto else ()
    if boto and isinstance(exc, transient) or type(exc).__name__ == "ResponseStreamingError":
        return str(exc), True
    if boto and isinstance(exc, boto.BotoCoreError):  # a bad profile, region or parameter
        return str(exc), False
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}", exc.code >= 500 or exc.code == 429
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason), not isinstance(exc.reason, ssl.SSLCertVerificationError)
    if isinstance(exc, OSError | EOFError | http.client.HTTPException) or is_urllib3(exc):
        return str(exc) or type(exc).__name__, True  # refused, reset, timed out, cut short
    if isinstance(exc, ValueError):  # a URL that cannot be sent (a space, a missing host)
        return str(exc), False
    raise exc


def is_urllib3(exc: Exception) -> bool:
    """A connection error of urllib3 (under botocore), which is not an OSError."""
    return type(exc).__module__.startswith("urllib3")


def retrying(location: str, request, writing: bool = False, stop: threading.Event | None = None):
    """request() (one request to the store) under the retry policy, its errors told apart by their
    type (`failure`): a missing file, a refusal or bad settings stop at once, in one line naming
    the location; what may pass is tried again. `writing`: the request writes (or deletes), and a
    missing bucket is a refusal like any other."""
    verb = "written" if writing else "read"

    def attempt():
        try:
            return request()
        except Stopped:
            raise
        except Exception as exc:
            why, again = failure(exc)
            why = " ".join(why.split())  # one line, whatever the library's message
            if is_missing(exc) and not writing:
                raise Missing(f"{location}: no such file ({why})") from None
            if not again:
                raise DataError(f"{location}: cannot be {verb} ({why}); check the location and the settings") from None
            raise Transient(f"{location}: cannot be {verb} ({why})", why) from None

    return retry(location, attempt, writing=writing, stop=stop)


def is_missing(exc: Exception) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code == 404
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return code in ("NoSuchKey", "404", "NoSuchBucket", "NotFound")
    return False


def http_get(url: str, start: int, end: int | None = None):
    """A response for bytes start..end-1 (to the end of the file for None). A server that ignores
    Range (python -m http.server) answers with the whole file: its first `start` bytes are dropped."""
    headers = {"Range": f"bytes={start}-{'' if end is None else end - 1}"} if start or end is not None else {}
    quoted = urllib.parse.quote(url, safe=":/?&=%#@+,;~!$'()*[]")  # a space or a non-ASCII name
    request = urllib.request.Request(quoted, headers=headers)
    for name, value in netrc_login(url).items():  # not sent on to another host a redirect names
        request.add_unredirected_header(name, value)
    response = urllib.request.urlopen(request, timeout=limits().deadline_s)
    if start and response.status != 206:
        skip = start
        while skip:
            got = len(read_within(response, min(skip, 1 << 20)))
            if not got:
                break
            count_fetched(got)
            skip -= got
    return response


def read_within(body, n: int, stop: threading.Event | None = None) -> bytes:
    """Up to n bytes of an answer (fewer only at its end) within StoreLimits.read_time(n): read
    as they arrive (read1), so that a trickle is noticed, not waited out byte by byte. TooSlow
    when the time is up first; Stopped once `stop` is set."""
    allowed = limits().read_time(n)
    read = getattr(body, "read1", None) or body.read
    started, parts, got = time.monotonic(), [], 0
    while got < n:
        if stop is not None and stop.is_set():
            raise Stopped("reading given up")
        part = read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
        took = time.monotonic() - started
        if got < n and took > allowed:
            lim = limits()
            raise TooSlow(
                f"too slow: {got} of {n} bytes in {took:.1f} s, under the minimum rate "
                f"(ALEXNET_STORE_DEADLINE_S={lim.deadline_s:g}, ALEXNET_STORE_MIN_RATE_KBS={lim.min_rate_kbs:g})"
            )
    return b"".join(parts)


def open_range(location: str, start: int):
    """A readable stream of `location` from byte `start` (one request)."""
    if location.startswith("s3://"):
        bucket, key = split_s3(location)
        body = s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-")["Body"]
        # botocore's StreamingBody reads until n bytes are there; its urllib3 answer has read1, which
        # gives what has arrived (read_within needs that), and RemoteFile notices an answer cut short
        return getattr(body, "_raw_stream", body)
    return http_get(location, start)


def size(location: str, stop: threading.Event | None = None) -> int:
    """The file's size in bytes; Missing when there is none."""
    if not is_remote(location):
        try:
            return os.path.getsize(location)
        except FileNotFoundError:
            raise Missing(f"{location}: no such file") from None
    if location.startswith("s3://"):
        bucket, key = split_s3(location)
        return retrying(location, lambda: s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"], stop=stop)

    def head():  # the first byte: its answer tells the size, where HEAD may be refused
        with http_get(location, 0, 1) as response:
            if response.status == 206:
                return int(response.headers["Content-Range"].rsplit("/", 1)[1])
            if response.headers["Content-Length"] is None:
                raise DataError(f"{location}: the server tells no size (no Content-Length); serve it with one")
            return int(response.headers["Content-Length"])

    return retrying(location, head, stop=stop)


def exists(location: str) -> bool:
    try:
        size(location)
    except Missing:
        return False
    return True


class RemoteFile(io.RawIOBase):
    """A remote file read from any position: a seek costs nothing until the next read, which then
    opens one ranged request and reads on from it. A request that fails mid-way is opened again at
    the byte it stopped at (see `retrying`)."""

    def __init__(self, location: str, stop: threading.Event | None = None):
        self.location, self.position, self.body, self.body_at = location, 0, None, None
        self.stop = stop  # once set, reading ends (Stopped) rather than waiting on the store
        self.size = size(location, stop)  # one request: a missing file is one line at once, not at the first read

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer) -> int:
        if self.position >= self.size:
            return 0

        def read() -> int:
            if self.body is None or self.body_at != self.position:
                self.drop()
                self.body, self.body_at = open_range(self.location, self.position), self.position
            try:
                # what is left of the file at most: the read's time limit is that of the bytes it can get
                data = read_within(self.body, min(len(buffer), self.size - self.position), self.stop)
                if not data:  # the answer ended before the file did: the connection was cut
                    raise EOFError(f"the answer ended at byte {self.position} of {self.size}")
                count_fetched(len(data))
            except Exception:
                self.drop()  # the next try opens a new request at this position
                raise
            buffer[: len(data)] = data
            return len(data)

        n = retrying(self.location, read, stop=self.stop)
        self.position += n
        self.body_at = self.position
        return n

    def drop(self) -> None:
        if self.body is not None:
            try:
                self.body.close()
            except Exception:
                pass
        self.body = None

    def close(self) -> None:
        self.drop()
        super().close()


def open_file(location: str, buffer: int = 1 << 20, stop: threading.Event | None = None):
    """`location` opened for reading in binary mode, local or remote, seekable either way. `stop`:
    once set, a remote file's reads end (Stopped) instead of waiting on the store."""
    if not is_remote(location):
        try:
            return open(location, "rb")
        except FileNotFoundError:
            raise Missing(f"{location}: no such file") from None
    return io.BufferedReader(RemoteFile(location, stop), buffer_size=buffer)


def read_bytes(location: str) -> bytes:
    with open_file(location) as f:
        return f.read()


def read_text(location: str) -> str:
    return read_bytes(location).decode()


def expand(pattern: str) -> list[str]:
    """The files a pattern names, in order: brace ranges (shard-{000000..000099}.tar), a local
    glob, or a folder or S3 prefix ending in / (every .tar under it). HTTP servers list nothing:
    name their tars with a brace pattern."""
    found = []
    for item in braceexpand(pattern if is_remote(pattern) else os.path.expanduser(pattern)):
        if item.endswith("/") or (not is_remote(item) and os.path.isdir(item)):
            found += folder_tars(item)
        elif not is_remote(item) and any(c in item for c in "*?["):
            found += sorted(str(p) for p in Path("/").glob(str(Path(item).resolve()).lstrip("/")))
        else:
            found.append(item if is_remote(item) else str(Path(item).resolve()))
    return found


def folder_tars(folder: str) -> list[str]:
    """The .tar files under a local folder or an S3 prefix, sorted by name."""
    if folder.startswith("s3://"):
        bucket, prefix = split_s3(folder)

        def listing():
            pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            return [o["Key"] for page in pages for o in page.get("Contents", [])]

        keys = retrying(folder, listing)
        return sorted(f"s3://{bucket}/{k}" for k in keys if k.endswith(".tar"))
    if is_remote(folder):
        raise DataError(
            f"{folder}: an HTTP server lists no folders; name the tars with a brace pattern, "
            "e.g. https://host/shards/shard-{000000..000099}.tar"
        )
    return sorted(str(p) for p in Path(folder).resolve().rglob("*.tar") if fnmatch.fnmatch(p.name, "*.tar"))


# Where an s3:// --out is made before its files are uploaded, unless --staging names a folder.
STAGING = Path(tempfile.gettempdir()) / "alexnet-prepare-staging"
PROBE = ".alexnet-prepare-probe"  # written and removed at the start: a bucket that refuses stops at once


def md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_writable(location: str) -> None:
    """A location alexnet-prepare can write: a local folder or s3://; never a local folder named
    after a URL (s3:/x, gs://x) nor one over HTTP, which has no standard way to write."""
    if location.startswith(("http://", "https://")):
        raise DataError(
            f"--out {location}: alexnet-prepare cannot write over HTTP; write to a local folder or "
            "s3://BUCKET/PREFIX, then serve that folder over HTTP if you like"
        )
    if not location.startswith("s3://") and re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/", location):
        raise DataError(
            f"--out {location}: looks like a URL, but alexnet-prepare writes to a local folder or "
            "s3://BUCKET/PREFIX only; give one of those"
        )


class Destination:
    """Where alexnet-prepare writes: a local folder, or an s3://BUCKET/PREFIX. Files are always
    made in the local `folder` (the destination itself, or for s3:// a staging folder, `staging`
    or one under STAGING named after the bucket and prefix) and then `put` there: uploaded, unless
    the bucket already holds them whole (the same size and MD5), so a re-run after an interrupted
    upload sends only what is missing. An object is uploaded in one PUT, which S3 makes visible
    whole or not at all.

    `volatile`: the files that describe the others (manifest.json, ...). Before the first other
    file in the bucket changes, they are deleted there: a reader never finds a manifest that
    names a file being replaced, and until the new one is put the prefix is no data set."""

    def __init__(self, location, staging: Path | None = None, volatile: tuple[str, ...] = ()):
        location = str(location)
        check_writable(location)
        self.remote = location.startswith("s3://")
        self.volatile, self.forgotten = volatile, False
        self.uploaded = self.kept = 0
        if not self.remote:
            self.location, self.folder = location, Path(location).expanduser()
            return
        bucket, prefix = split_s3(location)
        self.location = f"s3://{bucket}/{prefix.strip('/')}".rstrip("/")
        self.folder = Path(staging) if staging else STAGING / bucket / prefix.strip("/")
        self.own_staging = not staging  # a folder the user named is theirs to remove
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(
                f"{exc.filename}: cannot stage {self.location} there ({exc.strerror}); pass --staging a writable folder"
            ) from None

    def url(self, name: str) -> str:
        return join(self.location, name)

    def check(self) -> None:
        """For s3://: the bucket takes an object (the credentials, the bucket and the right to
        write are there), before any work that would be lost."""
        if self.remote:
            bucket, key = split_s3(self.url(PROBE))
            retrying(self.location, lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=b""), writing=True)
            retrying(self.location, lambda: s3_client().delete_object(Bucket=bucket, Key=key), writing=True)

    def put(self, name: str) -> None:
        """folder/name to the destination's name (for a local folder it is there already)."""
        if not self.remote:
            return
        path, location = self.folder / name, self.url(name)
        bucket, key = split_s3(location)
        digest = md5(path)

        def look():  # what the bucket holds there, or None
            try:
                return s3_client().head_object(Bucket=bucket, Key=key)
            except Exception as exc:
                if is_missing(exc):
                    return None
                raise

        there = retrying(location, look, writing=True)  # a part of writing: a failure says "cannot be written"
        if there and there["ContentLength"] == path.stat().st_size and there.get("Metadata", {}).get("md5") == digest:
            self.kept += 1
            return
        if name not in self.volatile:
            self.forget()

        def upload():
            with open(path, "rb") as f:
                s3_client().put_object(Bucket=bucket, Key=key, Body=f, Metadata={"md5": digest})

        retrying(location, upload, writing=True)
        self.uploaded += 1

    def forget(self) -> None:
        """Deletes the volatile files from the bucket, once."""
        if self.forgotten:
            return
        for name in self.volatile:
            self.delete(name)
        self.forgotten = True

    def delete(self, name: str) -> None:
        bucket, key = split_s3(self.url(name))
        retrying(self.url(name), lambda: s3_client().delete_object(Bucket=bucket, Key=key), writing=True)

    def prune(self, folder: str, pattern: str) -> None:
        """Deletes the objects directly under `folder` whose names match `pattern` and have no
        file in the local folder: those of an earlier preparation that this one does not make."""
        if not self.remote:
            return
        bucket, prefix = split_s3(self.url(folder) + "/")

        def listing():
            pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            return [o["Key"][len(prefix) :] for page in pages for o in page.get("Contents", [])]

        for name in retrying(self.url(folder), listing, writing=True):
            if re.fullmatch(pattern, name) and not (self.folder / folder / name).exists():
                self.forget()
                self.delete(f"{folder}/{name}")

    def finish(self) -> str:
        """After the last put: the default staging folder removed (the bucket holds it all now); one
        line saying what was sent, or '' for a local folder."""
        if not self.remote:
            return ""
        if self.own_staging:
            shutil.rmtree(self.folder, ignore_errors=True)
        return f"uploaded {self.uploaded} files to {self.location} ({self.kept} were there already)"
