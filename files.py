"""Files and images: one-line errors, progress, safe writes, CSV and manifest reading, safe paths,
image decoding and image sources (a folder, or a .zip read in place), the image lister.

Holds no data-set rules (data.py), no model, device or torch code at import time (nets.py) and
no drawing (pages.py): every other room reads and writes files through this one.

    import files
    im = files.load_image("painting.jpg", size=224)      # RGB, upright, JPEGs decoded reduced
    src = files.image_source("wikiart.zip")              # or a folder: .exists, .open, .members
    files.atomic_write("report.txt", text)

Bad input ends with one line (`UserError`); a full disk with one line naming the file
(`os_error_line`); an interrupted write leaves the old file or none, never a half one.
"""

import argparse
import contextlib
import csv
import errno
import functools
import hashlib
import io
import json
import math
import os
import posixpath
import re
import stat
import sys
import tempfile
import time
import warnings
import zipfile
import zlib

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif")
# At most this many pixels are decoded for one image: 90 MP is 270 MB as RGB. PIL itself refuses
# files over twice its own limit (179 MP) at open; JPEGs up to that decode reduced (draft mode).
MAX_PIXELS = 90_000_000
MAX_BYTES = 256 << 20  # a download larger than this is stopped: no painting JPEG is that big

# PIL warns at open for 89-179 MP (DecompressionBombWarning, a raw warning beside our lines);
# load_image says what happens to such an image itself: a JPEG decodes reduced, the rest over
# MAX_PIXELS are refused (PIL itself still refuses over 179 MP)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class UserError(Exception):
    """Bad input: main() prints it as one line and exits non-zero."""


# ----------------------------------------------------------------------------- shared helpers

DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError,  # PIL's ways
                 zipfile.BadZipFile, zlib.error, EOFError)  # and a zip member's (bad CRC-32,
# broken deflate stream, cut short) of saying "cannot read this image": every loader catches these


class Result(dict):
    """What a script's main([...]) returns: a dict of named fields (res["D"], res["config"]),
    shown as one line in a notebook cell, not as config dicts, score arrays or coordinates."""

    def __init__(self, line, fields):
        super().__init__(fields)
        self.line = line

    def __repr__(self):
        return f"<{self.line}>"


def read_state_dict(path, flag, choices, why_not=None):
    """A state_dict from a local file, loaded as tensors only (torch.load weights_only=True: a
    file cannot run code); flag and choices name the option in the one-line errors ('--weights',
    'imagenet|none'); why_not(state): a reason to refuse a file that loads (None: take it)."""
    import torch  # here, not at import: files.py stays torch-free for the rooms that are
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: file not found (or use {flag} {choices})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # pickle, zip and torch errors share no base class
        raise UserError(f"{flag} {path}: not a state_dict") from None
    why = why_not(state) if why_not else None
    if why:
        raise UserError(f"{flag} {path} {why}")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{flag} {path}: not a state_dict")
    return state


def one_line(e):
    """The first line of an exception's text, at most 200 characters (for one-line errors)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def tolerant_stdout():
    """Print undecodable bytes in paths (kept as surrogates) as \\udcxx escapes instead of
    dying on a strict UTF-8 stdout; a notebook's stream, which has no reconfigure, is left."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default, except None and False ones: their help says what happens then."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Progress:
    """`label: done/total (pct) rate unit/s ETA` on one line, at most every `every` seconds."""

    def __init__(self, total, label, unit="img", every=2.0, out=None):
        self.total, self.label, self.unit, self.every, self.out = total, label, unit, every, out
        self.done, self.t0, self.last = 0, time.time(), 0.0

    def update(self, n=1, extra=""):
        self.done += n
        now = time.time()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            print(self.line(extra), file=self.out or sys.stdout, flush=True)  # redirectable

    def line(self, extra=""):
        dt = max(time.time() - self.t0, 1e-9)
        rate = self.done / dt
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / max(self.total, 1)
        eta_s = "?" if math.isinf(eta) else fmt_seconds(eta)
        return (f"{self.label}: {self.done}/{self.total} ({pct:.0f}%) {rate:.1f} {self.unit}/s "
                f"ETA {eta_s}{' ' + extra if extra else ''}")


def fmt_seconds(s):
    s = int(round(s))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


@functools.lru_cache(maxsize=1)
def file_mode():
    """The mode a plain open() gives a new file here: 0o666 minus the umask. Linux shows the
    umask in /proc; elsewhere os.umask can only be read by setting it (once, then cached)."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(ln.split()[1], 8) for ln in f if ln.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def replaced(path, durable=False, suffix=".tmp"):
    """`with replaced(path) as tmp:` write tmp (a new name beside path), and path becomes it at
    the end of the block (os.replace: readers see the old file or the new, never half of one);
    an error inside leaves no temp and path as it was. durable: fsync tmp before and the folder
    after the rename (survives a power cut). A folder or a device at path is refused (the rename
    would replace a device node); path's folder is made. suffix: the temp's ending (".tmp.npy"
    for np.save, which adds .npy to any other name)."""
    if os.path.lexists(path) and not os.path.isfile(path):
        raise UserError(f"{path} exists and is not a regular file (a folder, a device): not "
                        "writing over it")
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f"{os.path.basename(path)}.", suffix=suffix)
    os.close(fd)  # a name of its own (no clash with another process or thread), opened anew
    try:
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; give the file the usual mode
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)  # after the rename there is none: only an error leaves one
    if durable and os.name == "posix":  # the rename itself is on disk once the folder is
        fsync_path(d)


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, data, mode="w", durable=False):
    """Write text or bytes to path through replaced(): never a half file (durable: fsynced)."""
    kw = {} if "b" in mode else {"encoding": "utf-8", "errors": "surrogateescape", "newline": ""}
    with replaced(path, durable) as tmp, writing(path), open(tmp, mode, **kw) as f:
        f.write(data)


def file_sha256(path):
    """sha256 (hex) of a file's bytes: the one identity of a weights file (the index records it
    as weights_sha256, crnn's feature cache keys on it): a copy under another name is the same
    file, any changed byte another. Hashed once per (path, size, mtime) in a process."""
    st = os.stat(path)
    return sha256_of(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def sha256_of(path, size, mtime_ns):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_output(path, flag):
    """One line, before any work, for an output file named by a flag that cannot be written:
    its folder missing (none is made for a typo), or the path a folder or a device."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: the folder {folder} does not exist")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise UserError(f"{flag} {path}: exists and is not a regular file (a folder, a device)")


def append_jsonl(path, record):
    """One JSON object as one line of a log file (log.jsonl: a run's history, appended)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")


def write_csv(path, header, rows):
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    atomic_write(path, buf.getvalue())


def read_csv(path, required=(), what="CSV"):
    """Rows of a headed CSV as dicts, columns by name; quoted fields may span lines."""
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            raise UserError(f"{path}: no column {', '.join(missing)} (header: {','.join(header)})")
        return list(reader)


def read_manifest(path, required=("path",)):
    try:
        rows = read_csv(path, required, what="manifest")
    except UserError as e:  # any CSV of paths and labels: data.py csv adds the split
        if "split" not in required or "no column" not in str(e):
            raise
        raise UserError(f"{e}; `python data.py csv --csv {path} --path-col path --label-cols "
                        "style --out DIR` writes a manifest with one") from None
    if not rows:
        raise UserError(f"manifest is empty: {path}")
    return rows


def unsafe_path(rel):
    """Why a relative path from a list or manifest may not be used under a root, or None."""
    if not rel or os.path.isabs(rel) or rel.startswith(("/", "\\")):
        return "path must be relative to the image root"
    if os.path.normpath(rel).replace("\\", "/").split("/")[0] == "..":
        return "path escapes the image root"
    return None


def safe_join(root, rel):
    """root/rel, refusing absolute paths and `..` that would leave root."""
    why = unsafe_path(rel)
    if why:
        raise UserError(f"{why}: {rel!r}")
    return os.path.normpath(os.path.join(root, rel))


# ----------------------------------------------------------------------------- full disks
# A full disk must end a command with one line naming the file, and leave no half files: every
# main() turns an OSError into os_error_line's line. A file written through a memory map is
# reserved on disk first (open_memmap): a page of a sparse file written through a map onto a
# full disk is a SIGBUS that kills the process, with no message and no cleanup.

@contextlib.contextmanager
def writing(path):
    """Inside, an OSError without a file name (a failed write, flush, close or fallocate has
    none) is raised again naming `path`."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror or one_line(e), os.fspath(path)) from e
        raise


def disk_full(e):
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1))


def mount_point(path):
    """The mount point of the file system that holds path (or would hold it)."""
    path = os.path.abspath(path)
    while not os.path.ismount(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def os_error_line(e):
    """One line for an OSError that ended a command: a full disk says which and what file."""
    if disk_full(e):
        return f"no space left on {mount_point(e.filename)} while writing {e.filename}" \
            if e.filename else f"no space left on device ({one_line(e)})"
    if e.filename:
        return f"{e.strerror or one_line(e)}: {e.filename}"
    return one_line(e)


def reserve(fd, start, length):
    """Allocate bytes [start, start + length) of the open file fd on disk: posix_fallocate, or
    zeros written where there is none (macOS, Windows, a file system without it). OSError
    (ENOSPC) when the disk cannot hold them."""
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, start, length)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    zeros, done = bytes(1 << 20), 0
    os.lseek(fd, start, os.SEEK_SET)
    while done < length:
        done += os.write(fd, zeros[:min(len(zeros), length - done)])


def open_memmap(path, dtype, shape):
    """np.lib.format.open_memmap(path, "w+", dtype, shape), its data reserved on disk before
    anything is written through the map; on failure (OSError naming path) no file is left."""
    arr = None
    try:
        with writing(path):
            arr = np.lib.format.open_memmap(path, "w+", dtype, shape)
            if arr.nbytes:
                with open(path, "r+b") as f:
                    reserve(f.fileno(), arr.offset, arr.nbytes)
    except BaseException:
        del arr  # unmapped before the file goes
        with contextlib.suppress(OSError):
            os.remove(path)
        raise
    return arr


def copy_rows(dst, parts, chunk_bytes=64 << 20):
    """dst = the first n rows of each (.npy path, n) in parts, in order: streamed about
    chunk_bytes at a time (bounded memory at any size), through a temp file renamed at the end.
    dst takes the dtype and row shape of the first part."""
    srcs = [(np.load(p, mmap_mode="r"), n) for p, n in parts]
    first = srcs[0][0]
    shape = (sum(n for _, n in srcs), *first.shape[1:])
    step = max(1, chunk_bytes // max(1, first[:1].nbytes))  # rows per copy
    with replaced(dst, suffix=".tmp.npy") as tmp:
        out, at = open_memmap(tmp, first.dtype, shape), 0
        for a, n in srcs:
            for i in range(0, n, step):
                out[at + i:at + min(i + step, n)] = a[i:min(i + step, n)]
            at += n
        out.flush()
        del out


# ----------------------------------------------------------------------------- image loading

def draft_size(size, short):
    """(w, h) to ask JPEG draft mode for so that the shorter side stays >= `short`."""
    w, h = size
    s = short / min(w, h)
    return max(1, math.ceil(w * s)), max(1, math.ceil(h * s))


def to_rgb(im):
    """Any PIL mode to 8-bit RGB: 16-bit scaled (not clipped), alpha composited on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        scale = 257.0 if a.max(initial=0) > 255 or im.mode.startswith("I;16") else 1.0
        im = Image.fromarray(np.clip(a / scale + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im) * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im if im.mode == "RGB" else im.convert("RGB")


def load_image(path, size=None):
    """Decode `path` to an RGB PIL image, upright per EXIF.

    With `size` (px, shorter side), JPEGs decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
    scaling, PIL draft mode) while staying >= size: a 3000 px WikiArt original decodes several
    times faster; other formats are reduced by an integer factor right after decoding. Raises
    one of DECODE_ERRORS for unreadable files, and for images of more than MAX_PIXELS after
    draft mode (callers decide to skip).
    """
    with Image.open(path) as im:
        if size and im.format == "JPEG":
            im.draft("RGB", draft_size(im.size, size))
        if im.width * im.height > MAX_PIXELS:  # the header alone tells; nothing decoded yet
            raise Image.DecompressionBombError(
                f"{im.width}x{im.height} px is more than {MAX_PIXELS // 10**6} MP to decode")
        im.load()
        if hasattr(path, "read"):  # read to its end: a zip member's CRC-32 is checked there
            while path.read(1 << 20):
                pass
        factor = min(im.size) // size if size else 1
        if factor >= 2 and im.mode in ("RGB", "RGBA", "L", "LA", "CMYK"):  # what reduce() takes
            im = im.reduce(factor)  # frees the full-size copy before rotating and converting
        im = ImageOps.exif_transpose(im)
        return to_rgb(im)


def decode_error(e):
    """A short reason for an image that did not load: missing, permission, size or format."""
    if isinstance(e, FileNotFoundError):
        return "missing"
    if getattr(e, "errno", None) == errno.ELOOP:
        return "symlink loop"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, Image.DecompressionBombError):
        return f"too large to decode ({one_line(e)})"
    return f"cannot decode ({one_line(e)})"


class ImageDataset:
    """Map-style dataset over relative paths under `root` (a folder or a .zip, see
    image_source): item i is (transform(img), i).

    An unreadable image yields (None, i, reason), so a DataLoader with `collate_skip` drops it
    and hands the reason to the main process, which counts and lists it (one clean line, even
    with worker processes).
    """

    def __init__(self, paths, root, transform=None, size=None):
        self.paths, self.root, self.transform, self.size = list(paths), root, transform, size
        self.source = image_source(root, must_exist=False)
        for p in self.paths:  # refuse `../` now, not as a silently skipped image later
            self.source.check_rel(p)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            im = load_image(self.source.loadable(self.paths[i]), self.size)
        except DECODE_ERRORS as e:
            return None, i, decode_error(e)
        return (self.transform(im) if self.transform else im), i


class FileBytes(ImageDataset):
    """Item i is (the JPEG file's bytes as a uint8 array, i), for decoders that take encoded
    bytes (nvJPEG on a GPU); (None, i, why) for a file that is not a JPEG, does not read, or
    whose header says more than MAX_PIXELS (those go the PIL way: ImageDataset, draft mode)."""

    def __getitem__(self, i):
        try:
            with self.source.open(self.paths[i]) as f:
                blob = f.read()
            with Image.open(io.BytesIO(blob)) as im:  # the header only: format and size
                if im.format != "JPEG" or im.width * im.height > MAX_PIXELS:
                    return None, i, "not a JPEG within MAX_PIXELS"
        except DECODE_ERRORS as e:
            return None, i, decode_error(e)
        return np.frombuffer(blob, np.uint8), i


def collate_bytes(batch):
    """(blobs, idx, failed) for FileBytes: a list of uint8 tensors of several lengths."""
    import torch
    good = [b for b in batch if len(b) == 2]
    failed = [(b[1], b[2]) for b in batch if len(b) == 3]
    if not good:
        return None, None, failed
    return [torch.from_numpy(b[0].copy()) for b in good], torch.tensor([b[1] for b in good]), \
        failed


def collate_skip(batch):
    """(x, idx, failed): default_collate of the images that loaded (x and idx None when none
    did) and failed = [(index, reason)] for those that did not."""
    from torch.utils.data import default_collate
    good = [b for b in batch if len(b) == 2]
    failed = [(b[1], b[2]) for b in batch if len(b) == 3]
    return (*default_collate(good), failed) if good else (None, None, failed)


def image_problem(path):
    """None when the file decodes (at reduced scale: a cheap but complete read), else why not."""
    try:
        load_image(path, 32)
        return None
    except DECODE_ERRORS as e:
        return decode_error(e)


# ----------------------------------------------------------------------------- image sources
# An image root is a folder or a .zip read in place: WikiArt's 25 GB zip need not be extracted.
# Everything that reads images by relative path goes through image_source(root).

ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
# JPEG, PNG, WebP and GIF are compressed already: a zip stores them at about 1:1. A member that
# inflates more than this is no such image (a 2 GB run of zeros deflates 300:1 into 6.7 MB).
PACKED_EXTS, MAX_INFLATE = (".jpg", ".jpeg", ".png", ".webp", ".gif"), 100


def image_source(root, must_exist=True):
    """FolderImages or ZipImages for `root`: a file (normally *.zip) is read as a zip archive.

    must_exist=False gives a folder source for a root that is not there (its images then read
    as missing), for callers that skip unreadable images anyway."""
    root = os.fspath(root)
    if os.path.isfile(root):
        st = os.stat(root)
        return open_zip(os.path.abspath(root), st.st_mtime_ns, st.st_size)
    if must_exist and not os.path.isdir(root):
        kind = "zip" if root.lower().endswith(".zip") else "folder"
        raise UserError(f"image {kind} not found: {root}")
    return FolderImages(root)


class FolderImages:
    """Images under a folder, by path relative to it (safe_join refuses `..` and absolute)."""

    def __init__(self, root):
        self.root = root

    def __str__(self):
        return self.root

    def check_rel(self, rel):
        return safe_join(self.root, rel)

    def exists(self, rel):
        return os.path.isfile(safe_join(self.root, rel))

    def absent(self, rel):
        """Why rel is no file here: missing, a symlink loop, not readable, not a file."""
        try:
            st = os.stat(safe_join(self.root, rel))
        except FileNotFoundError:
            return "missing"
        except OSError as e:
            return "symlink loop" if e.errno == errno.ELOOP else f"cannot read ({one_line(e)})"
        return None if stat.S_ISREG(st.st_mode) else "not a file"

    def open(self, rel):
        return open(safe_join(self.root, rel), "rb")

    def loadable(self, rel):
        """What load_image reads: here the file's path."""
        return safe_join(self.root, rel)

    thumb = loadable  # pages.thumbnail draws a grey square for a path that does not decode

    def mtime(self, rel):
        return os.path.getmtime(safe_join(self.root, rel))

    def members(self, skip_dir=None):
        """Sorted relative paths of every file under the root, not descending into skip_dir."""
        skip = os.path.abspath(skip_dir) if skip_dir else None
        out = []
        for d, dirs, files in os.walk(self.root):
            dirs[:] = sorted(x for x in dirs if os.path.abspath(os.path.join(d, x)) != skip)
            out += [os.path.relpath(os.path.join(d, f), self.root).replace(os.sep, "/")
                    for f in sorted(files)]
        return out


def scan_images(root, skip_dir=None):
    """(relative paths of the images under root, a folder (not under skip_dir) or a zip, in
    members() order; how many other files there are): the one image lister (retrieve's
    collection, crnn's --predict folders). Names starting with '.' are no images."""
    paths, others = [], 0
    for rel in image_source(root).members(skip_dir):
        name = rel.rsplit("/", 1)[-1]
        if name.lower().endswith(IMAGE_EXTS) and not name.startswith("."):
            paths.append(rel)
        else:
            others += 1
    return paths, others


@functools.lru_cache(maxsize=4)
def open_zip(path, mtime_ns, size):
    """One ZipImages per zip file and version: reading the central directory of 81k members
    takes a while, and a training run builds several datasets over the same root."""
    return ZipImages(path)


def member_name(info):
    """A member's name as the lists spell it: names without the zip UTF-8 flag were decoded as
    cp437 by zipfile; Info-ZIP on Linux stores UTF-8 bytes there, so decode those as UTF-8."""
    if info.flag_bits & 0x800:
        return info.filename
    return info.filename.encode("cp437").decode("utf-8", errors="surrogateescape")


def zip_rel(rel):
    """rel normalised to a member name; refuses absolute paths and `..` out of the root."""
    norm = posixpath.normpath(str(rel).replace("\\", "/")) if rel else ""
    if not rel or norm.startswith("/") or norm == ".." or norm.startswith("../") or \
            re.match(r"^[A-Za-z]:", norm):
        raise UserError(f"path escapes the image root: {rel!r}")
    return norm


class ZipImages:
    """Members of a .zip read in place, by path relative to the zip's root.

    A zip whose files all sit under one top folder (wikiart.zip holds wikiart/<Style>/...) is
    read as if that folder were the root; full member names work too. Reading a member to the
    end checks its CRC-32 (zipfile raises BadZipFile). The ZipFile handle opens lazily, once
    per process: forked DataLoader workers must not share the parent's file offset.
    """

    def __init__(self, path):
        self.path, self._zf, self._pid = path, None, None
        infos = [i for i in self.handle().infolist() if not i.is_dir()]
        names = [zip_rel_or_none(member_name(i)) for i in infos]
        if None in names:
            bad = member_name(infos[names.index(None)])
            raise UserError(f"{path}: member {bad!r} escapes the zip's root; not reading it")
        tops = {n.split("/", 1)[0] for n in names}
        one_top = len(tops) == 1 and all("/" in n for n in names)
        self.prefix = tops.pop() + "/" if one_top else ""
        self.index = {}
        for n, i in zip(names, infos, strict=True):  # the first of a repeated name, as unzip
            self.index.setdefault(n[len(self.prefix):], i)
        if len(self.index) < len(infos):
            again = next(n for n, i in zip(names, infos, strict=True)
                         if self.index[n[len(self.prefix):]] is not i)
            print(f"warning: {path}: {len(infos) - len(self.index)} members repeat an earlier "
                  f"name (e.g. {again}); the first of each is read, as unzip does")
        odd = sorted({i.compress_type for i in infos} - set(ZIP_METHODS))
        if odd:
            raise UserError(f"{path}: members compressed with method {odd[0]} (9 is Deflate64), "
                            "which Python's zipfile cannot read; extract it and pass the folder")

    def __str__(self):
        return self.path

    def __getstate__(self):  # pickled into spawned workers: without the open handle
        return {**self.__dict__, "_zf": None, "_pid": None}

    def handle(self):
        if self._zf is None or self._pid != os.getpid():
            try:
                self._zf, self._pid = zipfile.ZipFile(self.path), os.getpid()
            except (zipfile.BadZipFile, OSError) as e:  # not a zip, or cut short (no directory)
                raise UserError(f"cannot read zip {self.path}: {one_line(e)}") from None
        return self._zf

    def info(self, rel):
        rel = zip_rel(rel)
        found = self.index.get(rel)
        if found is None and self.prefix and rel.startswith(self.prefix):
            found = self.index.get(rel[len(self.prefix):])
        return found

    def check_rel(self, rel):
        return zip_rel(rel)

    def exists(self, rel):
        return self.info(rel) is not None

    def absent(self, rel):
        return None if self.exists(rel) else "missing"

    def read(self, rel):
        """The member's bytes, CRC-checked (BadZipFile when they do not match)."""
        with self.open(rel) as f:
            return f.read()

    def open(self, rel):
        """The member as a stream (zipfile's: it inflates as it is read, at most the size the
        zip records, and checks the CRC-32 at the end). A size or ratio no image has is
        refused before anything is read (DecompressionBombError)."""
        info = self.info(rel)
        if info is None:
            raise FileNotFoundError(f"not in {self.path}: {rel}")
        why = member_problem(info)
        if why:
            raise Image.DecompressionBombError(f"{rel} in {self.path}: {why}")
        return self.handle().open(info)

    loadable = open

    def thumb(self, rel):
        """The member for pages.thumbnail; empty bytes (a grey square) when unreadable."""
        try:
            return self.open(rel)
        except DECODE_ERRORS:
            return io.BytesIO(b"")

    def mtime(self, rel):
        return os.path.getmtime(self.path)

    def members(self, skip_dir=None):
        return sorted(self.index)


def member_problem(info):
    """Why a zip member is no image to read (its recorded sizes, before reading), or None."""
    size, packed = info.file_size, max(info.compress_size, 1)
    if size > MAX_BYTES:
        return f"{size} bytes inflated (over {MAX_BYTES >> 20} MB)"
    if info.filename.lower().endswith(PACKED_EXTS) and size > MAX_INFLATE * packed:
        return f"inflates {size // packed}:1 ({packed} to {size} bytes), no image does"
    return None


def zip_rel_or_none(name):
    try:
        return zip_rel(name)
    except UserError:
        return None


def check_member(source, rel):
    """None when `rel` is in source and decodes (a zip member's CRC-32 checked too), else why
    not: 'missing', 'bad CRC' or 'corrupt'."""
    if not source.exists(rel):
        return source.absent(rel) or "missing"
    try:
        with source.open(rel) as f:
            load_image(f, 32)  # reduced scale: a cheap but complete read
    except zipfile.BadZipFile as e:
        return "bad CRC" if "CRC" in str(e) else f"zip: {one_line(e)}"
    except Image.DecompressionBombError as e:
        return decode_error(e)
    except DECODE_ERRORS:
        return "corrupt"
    return None
