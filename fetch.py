"""The resumable HTTP downloader: at most N requests in flight, retries with backoff and
Retry-After, http(s) only, a size cap, finished files only (temp file, then rename).

Holds no data-set rules (data.py runs it for `download` and `hf-wikiart`) and no image reading
beyond checking that a body decodes (files.py).

    import fetch
    failures, left = fetch.run_downloads([(name, url, dest), ...], args)   # args: workers,
    # retries, backoff, timeout, max_bytes; left > 0 when interrupted (Ctrl-C)
"""

import email.utils
import errno
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed

from files import Progress, UserError, disk_full, image_problem, replaced

USER_AGENT = "ArtExtract/0.1 (open-source research toolkit; python-urllib)"


class Retry(Exception):
    """Transient trouble from a server that answered (or timed out): worth another try."""

    def __init__(self, msg, wait=None):
        super().__init__(msg)
        self.wait = wait


class Unreachable(Retry):
    """No connection at all (no DNS, refused, no route): retried only once a server answered."""


class Refused(Exception):
    """A response we will not take (another scheme, too large): a failure, never retried."""


class HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http and https only (urllib's own also follows ftp)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise Refused(f"redirect to {newurl[:80]} refused (http and https only)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


OPENER = urllib.request.build_opener(HttpOnlyRedirects)
NO_ROUTE = (socket.gaierror, ConnectionRefusedError, errno.ENETUNREACH, errno.EHOSTUNREACH)


def url_problem(url):
    """Why url may not be downloaded, or None: http and https only, never file:// or ftp://."""
    if urllib.parse.urlsplit(url).scheme.lower() not in ("http", "https"):
        return f"not an http(s) URL: {url[:80]}"
    return None


def retry_after(value):
    """Seconds from a Retry-After header (delta-seconds or HTTP date), else None."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def fetch(url, dest, args, stop, reached, check=None):
    """One GET to a temp file beside dest; raises Retry for transient trouble, Refused for a
    response over args.max_bytes or a redirect off http(s). Sets `reached` once a server
    answered. check(path) -> (ok, what): whether the body is what we asked for (default: a
    decodable image)."""
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with replaced(dest, suffix=".part") as tmp:
            with OPENER.open(req, timeout=args.timeout) as r, open(tmp, "wb") as f:
                reached.set()
                stream(r, f, args.max_bytes, stop)
            ok, what = check(tmp) if check else (image_problem(tmp) is None, "a decodable image")
            if not ok:
                raise Retry(f"downloaded file is not {what}")
    except urllib.error.HTTPError as e:
        reached.set()
        if e.code == 429 or e.code >= 500:
            raise Retry(f"HTTP {e.code}", retry_after(e.headers.get("Retry-After"))) from e
        raise
    except OSError as e:  # URLError, timeouts, resets: transient, worth another try
        if disk_full(e):  # not transient: every file would fail the same way
            raise OSError(e.errno, e.strerror, e.filename or dest) from None
        why = getattr(e, "reason", e)
        kind = Unreachable if isinstance(why, NO_ROUTE[:2]) or \
            getattr(why, "errno", None) in NO_ROUTE[2:] else Retry
        raise kind(f"{type(e).__name__}: {why}") from e


def stream(r, f, max_bytes, stop):
    """Copies the response r to the file f, refusing more than max_bytes (declared or sent)."""
    declared = r.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise Refused(f"response of {int(declared)} bytes is over --max-bytes {max_bytes}")
    got = 0
    while chunk := r.read(1 << 16):
        if stop.is_set():
            raise KeyboardInterrupt
        got += len(chunk)
        if got > max_bytes:
            raise Refused(f"response is over --max-bytes {max_bytes}")
        f.write(chunk)


def download_one(url, dest, args, stop, reached, check=None):
    """Fetch with exponential backoff (x2 per try, jittered, capped 120 s) or Retry-After.
    No connection at all is not retried until some server has answered: offline, every try
    would wait out the whole backoff."""
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    for attempt in range(args.retries + 1):
        try:
            fetch(url, dest, args, stop, reached, check)
            return None
        except Refused as e:
            return str(e)
        except Retry as e:
            if attempt == args.retries or isinstance(e, Unreachable) and not reached.is_set():
                return str(e)
            wait = e.wait if e.wait is not None else args.backoff * 2 ** attempt
            wait = min(wait, 120.0) * (1 + 0.1 * random.random())
            if stop.wait(wait):
                raise KeyboardInterrupt from None
        except urllib.error.HTTPError as e:
            return f"HTTP {e.code}"
    return "gave up"


def run_downloads(jobs, args, check=None, unit="img"):
    """At most args.workers requests in flight. Ctrl-C: finished files stay, the rest wait."""
    stop, reached, failures = threading.Event(), threading.Event(), []
    prog = Progress(len(jobs), "download", unit=unit)
    pool = ThreadPoolExecutor(max_workers=max(1, args.workers))
    futures = {pool.submit(download_one, url, dest, args, stop, reached, check): (p, url)
               for p, url, dest in jobs}
    try:
        for fut in as_completed(futures):
            err = fut.exception() or fut.result()
            if disk_full(err):  # one line from main(), not a failure per file
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise err
            if err and not isinstance(err, KeyboardInterrupt):
                failures.append((*futures[fut], str(err)))
            prog.update(1, f"failed {len(failures)}")
            if len(failures) >= min(3, len(jobs)) and not reached.is_set():
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise UserError(f"no server answered the first {len(failures)} requests "
                                f"({failures[0][2]}): offline? Nothing was downloaded")
    except KeyboardInterrupt:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        left = sum(1 for f in futures if f.cancelled() or isinstance(
            f.exception() if not f.cancelled() else None, KeyboardInterrupt))
        print("\ninterrupted: finished files are kept; run the same command to continue")
        return failures, max(left, 1)
    pool.shutdown()
    return failures, 0
