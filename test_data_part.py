import csv
import io
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

import data

# ----------------------------------------------------------------------------- fixtures


def jpeg_bytes(size=(64, 48), color=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def read_rows(path):
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return list(csv.DictReader(f))


MOJI = "Art_Nouveau_Modern/eugã¨ne-grasset_la-belle\u00adjardini\u00a0re.jpg"


def write_lists(d):
    """Small ArtGAN-format lists with the real quirks."""
    os.makedirs(d, exist_ok=True)
    styles = ["Art_Nouveau", "Baroque", "Cubism", "Tiny"]
    with open(os.path.join(d, "style_class.txt"), "w", newline="") as f:
        f.write("".join(f"{i} {n}\n" for i, n in enumerate(styles)))
    with open(os.path.join(d, "genre_class"), "w", newline="") as f:
        f.write("0 landscape\n1 portrait\n2 still_life\n3 cityscape\n4 religious_painting\n")
    with open(os.path.join(d, "artist_class"), "w", newline="") as f:
        f.write("0 Rembrandt\n1 Eugene_Grasset\n")
    train, val = [], []
    for c, name in enumerate(styles[:3]):
        folder = "Art_Nouveau_Modern" if name == "Art_Nouveau" else name
        for i in range(20):
            (val if i % 4 == 0 else train).append((f"{folder}/artist-{c}_work-{i}(1).jpg", c))
    train.append((MOJI, 0))
    train += [("Tiny/a_b.jpg", 3), ("Tiny/a_c.jpg", 3)]
    for name, rows in (("style_train.csv", train), ("style_val.csv", val)):
        with open(os.path.join(d, name), "wb") as f:  # CRLF, no header, UTF-8 bytes
            f.write("".join(f"{p},{y}\r\n" for p, y in rows).encode("utf-8"))
    # genre: a conflicting duplicate in val; a cross-task split conflict (style val, genre train)
    g_train = [("Baroque/artist-1_work-0(1).jpg", 1), ("Baroque/artist-1_work-1(1).jpg", 4)]
    g_val = [("Cubism/artist-2_work-3(1).jpg", 1), ("Cubism/artist-2_work-3(1).jpg", 4),
             (MOJI, 0)]
    for name, rows in (("genre_train.csv", g_train), ("genre_val.csv", g_val)):
        with open(os.path.join(d, name), "wb") as f:
            f.write("".join(f"{p},{y}\r\n" for p, y in rows).encode("utf-8"))
    with open(os.path.join(d, "artist_train"), "w", newline="") as f:
        f.write("(Path to image),, (Groundtruth class) \n\n")
        f.write("Baroque/artist-1_work-2(1).jpg,,0\n" + f"{MOJI},,1\n")
    with open(os.path.join(d, "artist_val"), "w", newline="") as f:
        f.write("(Path to image),, (Groundtruth class)\n\nBaroque/artist-1_work-5(1).jpg,,0\n")
    return train + val


# ----------------------------------------------------------------------------- wikiart


def test_data_wikiart_real_list_formats(tmp_path, capsys):
    write_lists(tmp_path / "lists")
    out = tmp_path / "out"
    assert data.main(["wikiart", "--lists", str(tmp_path / "lists"), "--out", str(out),
                      "--per-class", "12", "--min-per-class", "5", "--seed", "3"]) == 0
    log = capsys.readouterr().out
    rows = read_rows(out / "manifest.csv")
    assert list(rows[0]) == ["path", "style", "artist", "genre", "split"]
    counts = {}
    for r in rows:
        counts[r["style"]] = counts.get(r["style"], 0) + 1
    assert counts == {"Art_Nouveau": 12, "Baroque": 12, "Cubism": 12}  # Tiny (2) dropped
    assert "dropped class Tiny" in log
    assert "conflicting labels" in log
    assert all(r["split"] in ("train", "val") for r in rows)
    for c in counts:  # stratified: every class has val images, ~20%
        n_val = sum(1 for r in rows if r["style"] == c and r["split"] == "val")
        assert 1 <= n_val <= 4
    classes = __import__("json").loads((out / "classes.json").read_text())
    assert classes["style"] == ["Art_Nouveau", "Baroque", "Cubism"]


def test_data_wikiart_labels_bytes_and_conflicts(tmp_path):
    write_lists(tmp_path / "lists")
    out = tmp_path / "out"
    data.main(["wikiart", "--lists", str(tmp_path / "lists"), "--out", str(out),
               "--per-class", "0", "--min-per-class", "1"])
    rows = {r["path"]: r for r in read_rows(out / "manifest.csv")}
    assert MOJI in rows  # soft hyphen, no-break space and mojibake kept byte for byte
    assert rows[MOJI]["artist"] == "Eugene_Grasset" and rows[MOJI]["genre"] == "landscape"
    assert rows["Baroque/artist-1_work-1(1).jpg"]["genre"] == "religious_painting"
    assert rows["Cubism/artist-2_work-3(1).jpg"]["genre"] == ""  # listed as 1 and 4: dropped
    assert rows["Baroque/artist-1_work-5(1).jpg"]["artist"] == "Rembrandt"
    assert rows["Baroque/artist-1_work-3(1).jpg"]["artist"] == ""
    assert len(rows) == 63  # one split column: a path cannot be in both splits


def test_data_wikiart_deterministic_for_seed(tmp_path):
    write_lists(tmp_path / "lists")
    outs = []
    for i, seed in enumerate([1, 1, 2]):
        out = tmp_path / f"o{i}"
        data.main(["wikiart", "--lists", str(tmp_path / "lists"), "--out", str(out),
                   "--per-class", "10", "--seed", str(seed)])
        outs.append((out / "manifest.csv").read_bytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_data_wikiart_images_filter(tmp_path, capsys):
    items = write_lists(tmp_path / "lists")
    root = tmp_path / "img"
    for p, _ in items:
        if "work-7" in p:
            continue  # missing on disk
        os.makedirs(os.path.dirname(root / p), exist_ok=True)
        body = jpeg_bytes()
        (root / p).write_bytes(body[: len(body) // 3] if "work-9" in p else body)
    out = tmp_path / "out"
    data.main(["wikiart", "--lists", str(tmp_path / "lists"), "--out", str(out),
               "--per-class", "0", "--images", str(root)])
    rows = read_rows(out / "manifest.csv")
    assert not any("work-7" in r["path"] or "work-9" in r["path"] for r in rows)
    bad = read_rows(out / "unusable.csv")
    assert sorted({b["reason"] for b in bad}) == ["corrupt", "missing"]
    assert len(bad) == 6
    assert "3 missing and 3 corrupt" in capsys.readouterr().out


@pytest.mark.parametrize("argv, msg", [
    (["--lists", "NOPE"], "list folder not found"),
    (["--tasks", "style,colour"], "unknown task 'colour'"),
    (["--min-per-class", "1000"], "nothing left after filtering"),
])
def test_data_wikiart_bad_input(tmp_path, argv, msg):
    write_lists(tmp_path / "lists")
    base = ["wikiart", "--lists", str(tmp_path / "lists"), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match=msg) as e:
        data.main(base + argv)
    assert "\n" not in str(e.value)


def test_data_wikiart_missing_list_file(tmp_path):
    write_lists(tmp_path / "lists")
    os.remove(tmp_path / "lists" / "artist_val")
    with pytest.raises(SystemExit, match="no artist val list"):
        data.main(["wikiart", "--lists", str(tmp_path / "lists"), "--out", str(tmp_path / "o")])


# ----------------------------------------------------------------------------- nga

OBJECTS = (
    # header drift: a leading uuid column, columns in another order than the 2025 exports
    "uuid,objectid,accessionnum,title,displaydate,medium,dimensions,attributioninverted,"
    "attribution,classification\r\n"
    'u1,101,1949.6.1,Self-Portrait,c. 1630,oil on canvas,"overall: 74.6 × 65.1 cm\r\n'
    'framed: 99.7 × 91.1 cm","Leyster, Judith",Judith Leyster,Painting\n'
    'u2,102,1963.10.1,"The Boating Party, with ""quotes""",1893/1894,oil,"a\nb",'
    '"Cassatt, Mary",Mary Cassatt,Painting\n'
    "u3,103,1.1,No Image Yet,1900,oil,,,,Painting\n"
    "u4,104,1.2,A Drawing,1900,chalk,,,,Drawing\n"
    "u5,105,1.3,Portrait of a Man,1650,oil,,,,Painting\n"
)
IMAGES = (
    "uuid,iiifurl,iiifthumburl,viewtype,sequence,width,height,maxpixels,openaccess,created,"
    "modified,depictstmsobjectid,assistivetext\n"
    "a1,https://api.nga.gov/iiif/a1,t,alternate,0,10,10,,1,,,101,\n"
    "p1,https://api.nga.gov/iiif/p1,t,primary,1,10,10,,1,,,101,\n"
    "p0,https://api.nga.gov/iiif/p0,t,primary,0,10,10,,1,,,101,\"multi\nline\"\n"
    "p2,https://api.nga.gov/iiif/p2,t,primary,0,10,10,,1,,,102,\n"
    "p4,https://api.nga.gov/iiif/p4,t,primary,0,10,10,,1,,,104,\n"
    "p5,https://api.nga.gov/iiif/p5,t,primary,0,10,10,,0,,,105,\n"
)


def write_nga(d):
    os.makedirs(d, exist_ok=True)
    (d / "objects.csv").write_bytes(OBJECTS.encode())
    (d / "published_images.csv").write_bytes(IMAGES.encode())


def test_data_nga_one_primary_image_per_painting(tmp_path):
    write_nga(tmp_path)
    data.main(["nga", "--objects", str(tmp_path / "objects.csv"), "--published-images",
               str(tmp_path / "published_images.csv"), "--out", str(tmp_path / "o")])
    rows = read_rows(tmp_path / "o" / "manifest.csv")
    assert [r["objectid"] for r in rows] == ["101", "102", "105"]
    assert rows[0]["url"] == "https://api.nga.gov/iiif/p0/full/!512,512/0/default.jpg"
    assert rows[0]["attribution"] == "Judith Leyster" and rows[0]["path"] == "101.jpg"
    assert rows[1]["title"] == 'The Boating Party, with "quotes"'
    for col in ("path", "objectid", "title", "attribution", "displaydate", "url"):
        assert col in rows[0]


def test_data_nga_filters(tmp_path):
    write_nga(tmp_path)
    base = ["nga", "--objects", str(tmp_path / "objects.csv"), "--published-images",
            str(tmp_path / "published_images.csv"), "--out", str(tmp_path / "o")]
    data.main(base + ["--open-access", "--title-contains", "portrait", "--size", "256"])
    rows = read_rows(tmp_path / "o" / "manifest.csv")
    assert [r["objectid"] for r in rows] == ["101"]  # 105 is not open access
    assert rows[0]["url"].endswith("/full/!256,256/0/default.jpg")
    data.main(base + ["--limit", "1"])
    assert len(read_rows(tmp_path / "o" / "manifest.csv")) == 1


def test_data_nga_missing_column(tmp_path):
    write_nga(tmp_path)
    (tmp_path / "bad.csv").write_text("uuid,url,objectid\nx,y,101\n")
    with pytest.raises(SystemExit, match="no column iiifurl, depictstmsobjectid"):
        data.main(["nga", "--objects", str(tmp_path / "objects.csv"), "--published-images",
                   str(tmp_path / "bad.csv"), "--out", str(tmp_path / "o")])


# ----------------------------------------------------------------------------- download


class Server:
    """127.0.0.1 image server: 503-then-200, 429 with Retry-After, truncated JPEG, 404."""

    def __init__(self):
        self.hits, self.times, self.agents = {}, {}, set()
        self.inflight = self.max_inflight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                with server.lock:
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                    n = server.hits[self.path] = server.hits.get(self.path, 0) + 1
                    server.times.setdefault(self.path, []).append(time.time())
                    server.agents.add(self.headers.get("User-Agent"))
                try:
                    time.sleep(0.05)  # let requests overlap, to observe concurrency
                    self.respond(n)
                finally:
                    with server.lock:
                        server.inflight -= 1

            def respond(self, n):
                body = jpeg_bytes()
                if self.path.startswith("/flaky") and n == 1:
                    return self.send_error(503)
                if self.path.startswith("/slow") and n == 1:
                    self.send_response(429)
                    self.send_header("Retry-After", "1")
                    self.end_headers()
                    return
                if self.path.startswith("/missing"):
                    return self.send_error(404)
                if self.path.startswith("/trunc"):
                    body = body[: len(body) // 2]
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


def test_data_download_retries_failures_and_resume(tmp_path, server, capsys):
    names = [f"ok{i}" for i in range(6)] + ["flaky", "slow", "trunc", "missing"]
    rows = [[f"sub/{n}.jpg", f"{server.url}/{n}.jpg"] for n in names]
    data.write_csv(tmp_path / "m.csv", ["path", "url"], rows)
    root = tmp_path / "img"
    os.makedirs(root / "sub")
    (root / "sub" / "ok0.jpg").write_bytes(jpeg_bytes()[:100])  # a partial file from a crash
    argv = ["download", "--manifest", str(tmp_path / "m.csv"), "--root", str(root),
            "--workers", "2", "--backoff", "0.01", "--retries", "2", "--size", "0"]
    assert data.main(argv) == 1  # two failed
    for n in names[:8]:
        assert data.check_image(root / "sub" / f"{n}.jpg"), n
    assert not (root / "sub" / "trunc.jpg").exists() and not (root / "sub" / "missing.jpg").exists()
    assert not [f for f in os.listdir(root / "sub") if f.endswith(".part")]
    assert server.hits["/flaky.jpg"] == 2 and server.hits["/missing.jpg"] == 1
    assert server.hits["/trunc.jpg"] == 3  # retried: a bad body may be a transfer glitch
    t = server.times["/slow.jpg"]
    assert t[1] - t[0] >= 0.95  # Retry-After: 1 honoured
    assert server.max_inflight <= 2
    assert all(a and a.startswith("ArtExtract/") for a in server.agents)
    fails = read_rows(root / "download_failures.csv")
    assert sorted(f["path"] for f in fails) == ["sub/missing.jpg", "sub/trunc.jpg"]
    capsys.readouterr()
    before = dict(server.hits)
    assert data.main(argv) == 1  # resumed: finished files are not fetched again
    assert server.hits["/ok1.jpg"] == before["/ok1.jpg"]
    assert server.hits["/flaky.jpg"] == before["/flaky.jpg"]
    assert server.hits["/missing.jpg"] == before["/missing.jpg"] + 1
    assert "8 already here, 2 to fetch" in capsys.readouterr().out


def test_data_download_rejects_escaping_paths(tmp_path):
    data.write_csv(tmp_path / "m.csv", ["path", "url"], [["../evil.jpg", "http://127.0.0.1:9/x"]])
    with pytest.raises(SystemExit, match="escapes the image root"):
        data.main(["download", "--manifest", str(tmp_path / "m.csv"), "--root", str(tmp_path)])


def test_data_download_empty_manifest(tmp_path):
    (tmp_path / "m.csv").write_text("path,url\n")
    with pytest.raises(SystemExit, match="manifest is empty"):
        data.main(["download", "--manifest", str(tmp_path / "m.csv"), "--root", str(tmp_path)])


def test_data_retry_after_and_iiif_size():
    assert data.retry_after("7") == 7.0
    assert data.retry_after(None) is None
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= data.retry_after(later) <= 31
    url = "https://api.nga.gov/iiif/x/full/!512,512/0/default.jpg"
    assert data.resize_iiif(url, 256) == "https://api.nga.gov/iiif/x/full/!256,256/0/default.jpg"


# ----------------------------------------------------------------------------- resize + loading


def write_odd_images(root):
    os.makedirs(root, exist_ok=True)
    Image.new("CMYK", (300, 200), (0, 255, 255, 0)).save(root / "cmyk.jpg")  # red
    Image.fromarray(np.full((200, 300), 32896, np.uint16)).save(root / "gray16.png")
    p = Image.new("P", (200, 200), 0)
    p.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    p.paste(1, (50, 50, 150, 150))
    p.save(root / "palette.png", transparency=0)  # blue is transparent
    im = Image.new("RGB", (400, 200), (0, 128, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display: 200 wide, 400 high
    im.save(root / "rotated.jpg", exif=exif)
    (root / "trunc.jpg").write_bytes(jpeg_bytes((300, 300))[:300])
    Image.new("L", (256, 512), 90).save(root / "gray.jpg")


def test_data_resize_odd_images(tmp_path, capsys):
    src, cache = tmp_path / "src", tmp_path / "cache"
    write_odd_images(src)
    names = ["cmyk.jpg", "gray16.png", "palette.png", "rotated.jpg", "trunc.jpg", "gray.jpg"]
    data.write_csv(tmp_path / "m.csv", ["path"], [[n] for n in names])
    argv = ["resize", "--manifest", str(tmp_path / "m.csv"), "--root", str(src),
            "--out", str(cache), "--size", "64", "--workers", "2"]
    assert data.main(argv) == 0
    ims = {n: Image.open(cache / n) for n in names if n != "trunc.jpg"}
    assert all(im.mode == "RGB" and min(im.size) == 64 for im in ims.values())
    r, g, b = ims["cmyk.jpg"].getpixel((32, 32))
    assert r > 200 and g < 60 and b < 60
    assert abs(ims["gray16.png"].getpixel((10, 10))[0] - 128) <= 2  # scaled, not clipped to 255
    assert ims["palette.png"].getpixel((2, 2)) == (255, 255, 255)  # transparent -> white
    assert ims["palette.png"].getpixel((32, 32)) == (255, 0, 0)
    assert ims["rotated.jpg"].size == (64, 128)  # EXIF orientation applied
    assert ims["gray.jpg"].size == (64, 128)
    assert not (cache / "trunc.jpg").exists()
    assert [r["path"] for r in read_rows(cache / "unreadable.csv")] == ["trunc.jpg"]
    capsys.readouterr()
    mtimes = {n: os.path.getmtime(cache / n) for n in ims}
    data.main(argv)  # second run: nothing to do but the unreadable one
    assert "5 already cached, 1 to resize" in capsys.readouterr().out
    assert mtimes == {n: os.path.getmtime(cache / n) for n in ims}


def test_data_load_image_draft_decodes_smaller(tmp_path):
    Image.new("RGB", (2000, 1500), (10, 20, 30)).save(tmp_path / "big.jpg", quality=90)
    full = data.load_image(tmp_path / "big.jpg")
    small = data.load_image(tmp_path / "big.jpg", 224)
    assert full.size == (2000, 1500)
    assert small.size == (500, 375)  # DCT scaling 1/4, shorter side still >= 224


def test_data_image_dataset_skips_unreadable(tmp_path):
    write_odd_images(tmp_path)
    ds = data.ImageDataset(["cmyk.jpg", "trunc.jpg"], tmp_path, size=32)
    assert ds[0][0].mode == "RGB" and ds[0][1] == 0
    assert ds[1] is None
    batch = data.collate_skip([(np.zeros(2), 0), None, (np.ones(2), 2)])
    assert batch[1].tolist() == [0, 2]
    with pytest.raises(data.UserError, match="escapes"):
        data.ImageDataset(["../x.jpg"], tmp_path)


# ----------------------------------------------------------------------------- demo


def test_data_demo_formats(tmp_path, capsys):
    out = tmp_path / "demo"
    assert data.main(["demo", "--out", str(out), "--n", "48"]) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
    raw = (out / "lists" / "style_train.csv").read_bytes()
    assert raw.count(b"\r\n") == raw.count(b"\n") > 0
    art = (out / "lists" / "artist_train").read_text(encoding="utf-8").split("\n")
    assert art[0].startswith("(Path to image),,") and art[1] == "" and ",," in art[2]
    rows = read_rows(out / "manifest.csv")
    assert len(rows) == 48 and list(rows[0]) == ["path", "style", "artist", "genre", "split"]
    assert all(os.path.isfile(out / "images" / r["path"]) for r in rows)
    assert any("ã" in r["path"] for r in rows)
    gallery = read_rows(out / "gallery.csv")
    assert len(gallery) == 48 and gallery[0]["attribution"]
