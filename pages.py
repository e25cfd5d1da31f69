"""What people look at: contact sheets, confusion images, heat overlays and self-contained HTML.

Holds no model code and no metrics: callers pass in numbers, labels, image paths and numpy maps.

    import pages
    pages.contact_sheet([[(path, "line 1", "line 2"), ...], ...], "sheet.png")
    pages.heat_overlay(image, heat)                  # a (h, w) map over a PIL image, bilinear
    pages.draw_figures(thumb, figures, scale)        # pose skeletons over a thumbnail

Every HTML page is one file: thumbnails as base64 JPEG, pages.css inlined (scoped to `.ae`, so
that a notebook's own styles are left alone), plain JavaScript (map.js) only on the map, nothing
fetched.
"""

import base64
import functools
import hashlib
import html
import io
import json
import math
import os
from collections import Counter

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

import data
import files
import metrics
import poses

THUMB = 160  # px, the longer side of a thumbnail on a contact sheet
GREY = (200, 200, 200)  # stands in for an image that no longer decodes


def font(size=12):
    try:
        return ImageFont.load_default(size=size)  # scalable since Pillow 10.1
    except TypeError:  # older Pillow: one fixed bitmap size
        return ImageFont.load_default()


def fit_text(text, fnt, width):
    """text, cut with '...' to fit `width` px."""
    if fnt.getlength(text) <= width:
        return text
    while text and fnt.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def save_png(im, path):
    buf = io.BytesIO()
    im.save(buf, "PNG")
    files.atomic_write(path, buf.getvalue(), "wb")


def thumbnail(path, size=THUMB):
    """The image at path fitted into size x size, or a grey square when it does not decode."""
    return open_thumbnail(path, size)[0]


def image_file(root, rel):
    """What files.load_image reads for rel under root, a folder or a zip read in place (a path,
    or the zip member); an image missing there comes out grey."""
    return files.image_source(root, must_exist=False).thumb(rel)


def open_thumbnail(path, size=THUMB):
    """(image fitted into size x size, True), or (a grey square, False) when it does not decode."""
    try:
        return ImageOps.contain(files.load_image(path, size), (size, size)), True
    except files.DECODE_ERRORS:  # moved, unreadable, or too large to decode
        return Image.new("RGB", (size, size), GREY), False


def contact_sheet(rows, path, thumb=THUMB, frame_first=False):
    """A grid of thumbnails with two caption lines each, one row per list in rows.

    rows: [[(image path, line 1, line 2), ...], ...]; frame_first draws a blue frame around the
    first cell of each row (a query before its results)."""
    fnt, pad, caption = font(13), 10, 36
    cols = max([len(r) for r in rows] + [1])
    cell_w, cell_h = thumb + pad, thumb + caption + pad
    sheet = Image.new("RGB", (pad + cols * cell_w + (pad if frame_first else 0),
                              pad + max(len(rows), 1) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for r, cells in enumerate(rows):
        y = pad + r * cell_h
        for c, (image, line1, line2) in enumerate(cells):
            x = pad + c * cell_w + (pad if frame_first and c else 0)
            im = thumbnail(image, thumb)
            sheet.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
            if frame_first and c == 0:
                draw.rectangle([x - 3, y - 3, x + thumb + 2, y + thumb + 2],
                               outline=(30, 90, 200), width=2)
            for dy, text, grey in ((3, line1, 0), (19, line2, 70)):
                draw.text((x, y + thumb + dy), fit_text(text, fnt, thumb),
                          fill=(grey, grey, grey), font=fnt)
    save_png(sheet, path)


def confusion_png(cm, names, title, path, totals=None):
    """Heat map of row-normalised counts (recall per true class), with counts in the cells.
    totals: each row's count when cm is a part of a larger matrix (default: cm's row sums)."""
    n = len(names)
    cell = max(12, min(44, 900 // max(n, 1)))  # px: 27 WikiArt styles get 33 px cells
    fnt, small = font(13), font(max(8, min(12, cell // 3)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lab = int(min(220, max(probe.textlength(s, font=fnt) for s in names) + 12))
    W, H = lab + n * cell + 20, lab + n * cell + 30
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.text((8, 6), title, fill="black", font=fnt)
    total = cm.sum(1) if totals is None else np.asarray(totals)
    rows = cm / np.maximum(total, 1)[:, None]
    for i in range(n):
        d.text((6, 30 + lab + i * cell + cell // 2 - 7), fit_text(names[i], fnt, lab - 10),
               fill="black", font=fnt)
        tag = Image.new("RGB", (lab, cell), "white")  # column label, drawn then turned 90 deg
        ImageDraw.Draw(tag).text((4, cell // 2 - 7), fit_text(names[i], fnt, lab - 10),
                                 fill="black", font=fnt)
        im.paste(tag.rotate(90, expand=True), (lab + i * cell, 26))
        for j in range(n):
            v, x, y = rows[i, j], lab + j * cell, 30 + lab + i * cell
            rgb = tuple(int(255 - v * (255 - c)) for c in (8, 48, 107))  # white -> dark blue
            d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=rgb, outline=(220, 220, 220))
            if cm[i, j] and cell >= 18:
                d.text((x + 3, y + cell // 2 - 6), str(int(cm[i, j])), font=small,
                       fill="white" if v > 0.5 else "black")
    save_png(im, path)


# ----------------------------------------------------------------------------- heat maps

# jet, the usual Grad-CAM palette: dark blue (0) -> cyan -> yellow -> dark red (1)
JET_AT = [0.0, 0.125, 0.375, 0.625, 0.875, 1.0]
JET = np.array([(0, 0, 143), (0, 0, 255), (0, 255, 255), (255, 255, 0), (255, 0, 0),
                (128, 0, 0)], np.float32)
PANEL = 256  # px, the side of each picture in an explain PNG


def as_image(im):
    """A PIL RGB image from a PIL image or an (H, W, 3) uint8 array."""
    return im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, np.uint8), "RGB")


def heat_overlay(im, heat, vmax=None, alpha=0.5):
    """im with heat ((h, w) >= 0, e.g. one value per backbone grid cell) upsampled bilinearly to
    its size, divided by vmax (default: its maximum) and blended in as jet colours: dark blue
    at 0, red at vmax."""
    im = as_image(im).convert("RGB")
    h = np.asarray(heat, np.float32)
    top = float(h.max()) if vmax is None and h.size else vmax or 0.0
    h = h / top if top > 0 else np.zeros_like(h)
    up = np.asarray(Image.fromarray(h, "F").resize(im.size, Image.BILINEAR))  # pixel centres
    colours = np.stack([np.interp(np.clip(up, 0, 1), JET_AT, JET[:, c]) for c in range(3)], -1)
    out = (1 - alpha) * np.asarray(im, np.float32) + alpha * colours
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")


def attention_top(a):
    """The weight drawn red in an attention map: its peak, but at least twice the uniform
    weight 1/cells, so that an almost even map stays one colour instead of looking focused."""
    return max(float(np.max(a)), 2.0 / np.size(a))


def explain_png(image, panels, title, path):
    """The image, then one heat overlay per panel, side by side; panels: [(heat or None, vmax,
    caption line 1, caption line 2)]. A None heat shows the plain image."""
    im = as_image(image).convert("RGB")
    im = im.resize((PANEL, round(PANEL * im.height / im.width)), Image.BICUBIC)
    fnt, pad, top, caption = font(13), 10, 26, 40
    cells = [(im, "what the model saw", "(centre crop)")]
    cells += [(heat_overlay(im, h, top) if h is not None else im, a, b)
              for h, top, a, b in panels]
    sheet = Image.new("RGB", (pad + len(cells) * (PANEL + pad), top + im.height + caption),
                      "white")
    d = ImageDraw.Draw(sheet)
    d.text((pad, 6), fit_text(title, fnt, sheet.width - 2 * pad), fill="black", font=fnt)
    for i, (pic, a, b) in enumerate(cells):
        x = pad + i * (PANEL + pad)
        sheet.paste(pic, (x, top))
        for dy, text, grey in ((4, a, 0), (20, b, 80)):
            d.text((x, top + im.height + dy), fit_text(text, fnt, PANEL), fill=(grey,) * 3,
                   font=fnt)
    save_png(sheet, path)


# ----------------------------------------------------------------------------- figure skeletons

# one colour per figure, in turn: distinct on paintings' browns and greens, with a dark rim
FIGURE_COLOURS = [(255, 64, 64), (64, 200, 255), (255, 220, 0), (190, 90, 255), (60, 230, 120),
                  (255, 140, 0)]


def draw_figures(im, figures, scale=1.0, min_conf=0.5, width=None):
    """A copy of im with each figure's skeleton over it: COCO's limbs (poses.SKELETON) between
    joints that both show (confidence >= min_conf), a dot per joint, a colour per figure.
    figures: [{"keypoints": (17, 3)}, ...] or (17, 3) arrays, in the original image's pixels;
    scale: thumbnail px per original px (one number, or (sx, sy))."""
    im = as_image(im).convert("RGB")
    draw = ImageDraw.Draw(im)
    width = width or max(2, round(min(im.size) / 60))
    sx, sy = (scale, scale) if np.isscalar(scale) else scale
    for n, f in enumerate(figures):
        k = np.asarray(f["keypoints"] if isinstance(f, dict) else f, np.float64)
        xy, there = k[:, :2] * [sx, sy], k[:, 2] >= min_conf
        colour = FIGURE_COLOURS[n % len(FIGURE_COLOURS)]
        for fill, w in (((30, 30, 30), width + 2), (colour, width)):  # rim, then colour
            for a, b in poses.SKELETON:
                if there[a] and there[b]:
                    draw.line([tuple(xy[a]), tuple(xy[b])], fill=fill, width=w)
        r = width * 0.9
        for x, y in xy[there]:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=(30, 30, 30))
    return im


# ----------------------------------------------------------------------------- html pieces

THUMB_HTML = 128  # px, the longer side of a thumbnail embedded in a page
JPEG_QUALITY = 80  # ~4-7 KB per 128 px painting; 5,000 of them stay under 40 MB in base64
HERE = os.path.dirname(os.path.abspath(__file__))


@functools.cache
def asset(name):
    """pages.css or map.js, the files beside this one, read once: every page inlines what it
    uses (a page stays one file that fetches nothing)."""
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


def esc(x):
    """Text made safe for HTML (element content and quoted attributes)."""
    return html.escape(str(x), quote=True)


def jpeg_uri(im, quality=JPEG_QUALITY):
    buf = io.BytesIO()
    as_image(im).convert("RGB").save(buf, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def shrink(im, size=THUMB_HTML):
    """A copy of a PIL image fitted into size x size (kept small for a page)."""
    return ImageOps.contain(im, (size, size))


def img_tag(im, alt, size=THUMB_HTML):
    im = ImageOps.contain(as_image(im), (size, size))
    return f'<img src="{jpeg_uri(im)}" width="{im.width}" height="{im.height}" alt="{esc(alt)}">'


class Thumbs:
    """Thumbnail <img> tags for image paths, counting those that no longer decode (grey)."""

    def __init__(self, size=THUMB_HTML):
        self.size, self.bad = size, 0

    def tag(self, path, alt=""):
        """(the <img> tag, True), or (a grey square's, False) when the image does not decode."""
        im, ok = open_thumbnail(path, self.size)
        self.bad += not ok
        return img_tag(im, alt or ("unreadable image" if not ok else ""), self.size), ok


def page(title, body):
    """A whole page: everything inside one `.ae` block, so that it also shows in a notebook
    (IPython.display.HTML) without touching the notebook's own look."""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(title)}</title>\n<style>\n{asset('pages.css')}</style>\n</head>\n<body>\n"
            f'<div class="ae">\n<h1>{esc(title)}</h1>\n{body}\n</div>\n</body>\n</html>\n')


def write_page(path, title, body):
    files.atomic_write(path, page(title, body))
    return path


def meta_lines(lines, cls="meta"):
    return "".join(f'<p class="{cls}">{esc(s)}</p>\n' for s in lines if s)


def num(x, digits=3):
    return '<span class="na">n/a</span>' if x is None else f"{x:.{digits}f}"


def unreadable_note(n):
    return meta_lines([f"{n} image(s) no longer decode: shown as grey squares."], "warn") \
        if n else ""


# ----------------------------------------------------------------------------- crnn.py --eval

def baseline_table(rep, base):
    """The model beside the majority-class and uniform-random baselines on the same images."""
    rows = [("this model", rep["accuracy"], rep["macro"]["f1"], rep["weighted"]["f1"])]
    m, u = base["majority"], base["uniform"]
    if m:
        rows.append((f"majority class ({m['name']}, most frequent in train)", m["accuracy"],
                     m["macro_f1"], m["weighted_f1"]))
    rows.append(("uniform random (1/K each, expected)", u["accuracy"], u["macro_f1"],
                 u["weighted_f1"]))
    th = "".join(f"<th>{h}</th>" for h in ("on the same images", "accuracy", "macro F1",
                                             "weighted F1"))
    body = "".join(f"<tr><td>{esc(name)}</td><td>{num(a)}</td><td>{num(f)}</td><td>{num(w)}"
                   "</td></tr>" for name, a, f, w in rows)
    return f'<table class="num"><tr>{th}</tr>{body}</table>'


def metrics_table(rep, top3, base=None):
    """The text report's numbers (metrics.classification_report) as a table, then the
    baselines (crnn.task_result's) when given; n/a = undefined."""
    th = "".join(f"<th>{h}</th>" for h in ("class", "precision", "recall", "f1-score", "support"))
    rows = [f"<tr><td>{esc(c['name'])}</td><td>{num(c['precision'])}</td><td>{num(c['recall'])}"
            f"</td><td>{num(c['f1'])}</td><td>{c['support']}</td></tr>" for c in rep["per_class"]]
    rows.append(f'<tr class="sum"><td>accuracy</td><td></td><td></td><td>{num(rep["accuracy"])}'
                f'</td><td>{rep["n"]}</td></tr>')
    for avg in ("macro", "weighted"):  # micro avg = accuracy for single-label classes
        a = rep[avg]
        rows.append(f"<tr><td>{avg} avg</td><td>{num(a['precision'])}</td><td>{num(a['recall'])}"
                    f"</td><td>{num(a['f1'])}</td><td>{rep['n']}</td></tr>")
    rows.append(f"<tr><td>top-3 accuracy</td><td></td><td></td><td>{num(top3)}</td><td></td></tr>")
    notes = [f"undefined {w} (n/a, counted as 0 in macro/weighted): "
             + ", ".join(rep[f"undefined_{w}"]) for w in ("precision", "recall")
             if rep[f"undefined_{w}"]] + [metrics.absent_line(rep) if rep.get("absent") else ""]
    return (f'<div><table class="num"><tr>{th}</tr>{"".join(rows)}</table>'
            f'{meta_lines(notes)}{baseline_table(rep, base) if base else ""}</div>')


def cell_colour(v):
    """white (0) -> dark blue (1), as confusion_png; returns (background, text colour)."""
    r, g, b = (int(255 - v * (255 - c)) for c in (8, 48, 107))
    return f"#{r:02x}{g:02x}{b:02x}", "#fff" if v > 0.5 else "#222"


def confusion_grid(cm, names):
    """Counts in cells coloured by their share of the row (recall per true class); hovering a
    cell names its pair of classes."""
    cm = np.asarray(cm)
    totals = cm.sum(1)
    head = "<tr><th></th>" + "".join(f'<th class="col" title="predicted {esc(n)}">{esc(n)}</th>'
                                      for n in names) + "</tr>"
    rows = []
    for i, t in enumerate(names):
        cells = []
        for j, p in enumerate(names):
            v = cm[i, j] / max(totals[i], 1)
            bg, fg = cell_colour(v)
            tip = f"true {t} \u2192 predicted {p}: {cm[i, j]} of {totals[i]} ({v:.0%})"
            cells.append(f'<td style="background:{bg};color:{fg}" title="{esc(tip)}">'
                         f'{cm[i, j] if cm[i, j] else ""}</td>')
        rows.append(f'<tr><th class="row" title="true {esc(t)}">{esc(t)}</th>{"".join(cells)}'
                    "</tr>")
    return (f'<div><table class="cm">{head}{"".join(rows)}</table><p class="axis">rows: true '
            "class, columns: predicted; colour: share of the row (recall); hover a cell for "
            "its pair</p></div>")


GRID_MAX = 30  # classes: past this report.html lists the top confusions instead of the grid


def top_confusions(cm, names, n=20):
    """The n largest off-diagonal counts as a list, for a task with too many classes for a grid
    (186 artists: a 186 x 186 table off the page): true -> predicted, count, share of the row."""
    cm = np.asarray(cm)
    off = cm * (1 - np.eye(len(names), dtype=cm.dtype))
    order = np.argsort(-off, axis=None, kind="stable")[:n]
    items = [f"<li>true <b>{esc(names[i])}</b> \u2192 predicted <b>{esc(names[j])}</b>: "
             f"{cm[i, j]} of {cm[i].sum()} ({cm[i, j] / max(cm[i].sum(), 1):.0%})</li>"
             for i, j in zip(*np.unravel_index(order, cm.shape), strict=True) if cm[i, j]]
    return (f'<div><p class="axis">{len(names)} classes, too many for a grid: the '
            f"{len(items)} most frequent confusions (the full matrix is in the confusion CSV)"
            f'</p><ol class="confusions">{"".join(items)}</ol></div>')


def outlier_card(rank, o):
    """One misclassified painting: what the model saw, its attention, labels and the score."""
    if o.get("seen") is None:  # the file no longer decodes: a grey square, counted by the caller
        pics = img_tag(Image.new("RGB", (THUMB_HTML, THUMB_HTML), GREY), "unreadable image")
        peak = ""
    else:
        a = o["attention"]
        pics = img_tag(o["seen"], "what the model saw") + img_tag(
            heat_overlay(o["seen"], a, attention_top(a)), "attention over the grid")
        peak = f'<div class="k">attention peak {a.max():.2f}, uniform {1 / a.size:.2f}</div>'
    return (f'<div class="card wide outlier"><div class="pics">{pics}</div>'
            f'<div class="rank"><b>#{rank}</b> score {o["score"]:.3f}</div>'
            f'<div>true <b>{esc(o["true"])}</b> <span class="k">p {o["p_true"]:.3f}</span></div>'
            f'<div>pred <b>{esc(o["pred"])}</b> <span class="k">p {o["p_pred"]:.3f}</span></div>'
            f'{peak}<div class="k">{esc(o["path"])}</div></div>')


def eval_page(path, lines, results, outliers, asked):
    """crnn.py --eval's report.html. results: {task: {"report", "top3", "confusion"}};
    outliers: crnn.outliers() dicts with "seen" (the crop the model saw, uint8 array, or None
    when it no longer decodes) and "attention" (its grid of attention weights); asked: N."""
    bad = sum(o.get("seen") is None for o in outliers)
    body = "".join(meta_lines([s], "warn" if s.startswith("warning") else "meta")
                   for s in lines) + unreadable_note(bad)
    if asked:
        body += meta_lines([f"outliers: the {len(outliers)} most confident disagreements with "
                            "the labels (score = p(pred) - p(true)); left: the centre crop the "
                            "model saw, right: its attention over the backbone grid (red: the "
                            "peak weight or twice the uniform one, whichever is higher; blue: "
                            "0)"])
    else:
        body += meta_lines(["outliers: add --outliers N to list the most confident "
                            "disagreements with the labels"])
    for t, r in results.items():
        body += f'<h2>{esc(t)}: {r["report"]["n"]} labelled images</h2>\n<div class="row">'
        body += metrics_table(r["report"], r["top3"], r.get("baselines"))
        names = [c["name"] for c in r["report"]["per_class"]]
        body += (confusion_grid if len(names) <= GRID_MAX else top_confusions)(r["confusion"],
                                                                             names)
        body += "</div>\n"
        mine = [outlier_card(i, o) for i, o in enumerate(outliers, 1) if o["task"] == t]
        if asked:
            body += (f"<h3>{esc(t)} outliers: {len(mine)}</h3>\n<div class=\"cards\">"
                     f'{"".join(mine)}</div>\n')
    return write_page(path, "CRNN evaluation", body)


# ----------------------------------------------------------------------------- retrieve.py pages

def value_html(v):
    """A manifest value; web addresses become links (opened in a new tab, never fetched)."""
    if v.startswith(("http://", "https://")):
        return f'<a href="{esc(v)}" target="_blank" rel="noopener">link</a>'
    return esc(v)


def row_html(row, skip=("title",)):
    """Every non-empty column of a manifest row, the title first and in bold, and the nga.gov
    page of an NGA painting."""
    title = f'<div><b>{esc(row["title"])}</b></div>' if row.get("title") else ""
    cells = "".join(f'<tr><td class="k">{esc(k)}</td><td>{value_html(v)}</td></tr>'
                    for k, v in row.items() if v and k not in skip)
    nga = data.nga_page_url(row)
    link = f'<div><a href="{esc(nga)}" target="_blank" rel="noopener">nga.gov page</a></div>' \
        if nga else ""
    return f"{title}<table>{cells}</table>{link}"


def hit_card(thumbs, root, rank, score, row, extra=None):
    """extra (retrieve --by): {"image": what to draw instead (figures over it), "why": a line}."""
    extra = extra or {}
    tag, ok = thumbs.tag(extra.get("image") or image_file(root, row["path"]),
                         row.get("title", ""))
    why = f'<div class="why">{esc(extra["why"])}</div>' if extra.get("why") else ""
    return (f'<div class="card hit{"" if ok else " bad"}"><div class="pics">{tag}</div>'
            f'<div class="rank"><b>{rank}.</b> score {score:.3f}</div>{why}{row_html(row)}</div>')


def results_page(path, lines, queries, root):
    """retrieve.py --query/--query-id --html: per query, the query image then its neighbours in
    rank order. queries: [(query name, what load_image reads for it, [(score, manifest row[,
    hit_card's extra]), ...]), optionally a 4th item: the query's own manifest row (an indexed
    painting: its labels show under it)]; root: the index's image folder or zip."""
    thumbs, parts = Thumbs(), []
    for q, (file, image, hits, *own) in enumerate(queries, 1):
        tag, ok = thumbs.tag(image, "query")
        about = row_html(own[0]) if own and own[0] else f"<div>{esc(file)}</div>"
        cards = [f'<div class="card hit query{"" if ok else " bad"}"><div class="pics">{tag}'
                 f'</div><div class="rank"><b>query {q}</b></div>{about}</div>']
        cards += [hit_card(thumbs, root, r, *hit) for r, hit in enumerate(hits, 1)]
        parts.append(f"<h2>Query {q}: {esc(os.path.basename(file))}</h2>\n"
                     f'<div class="cards">{"".join(cards)}</div>\n')
    body = meta_lines(lines) + unreadable_note(thumbs.bad) + "".join(parts)
    write_page(path, "Similar paintings", body)
    return thumbs.bad


def table_html(head, rows):
    """A numeric table: head names, rows of (name, [cell text])."""
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    trs = "".join(f"<tr><td>{esc(name)}</td>{''.join(f'<td>{esc(c)}</td>' for c in cells)}</tr>"
                  for name, cells in rows)
    return f'<table class="num"><tr><th>protocol</th>{th}</tr>{trs}</table>'


def failure_card(thumbs, root, f):
    """A copy-detection miss: the transformed copy, what came first, the original and its rank."""
    first, orig = f["first"], f["original"]
    if first is None:  # an approximate index may return nothing
        tag1, found = img_tag(Image.new("RGB", (THUMB_HTML, THUMB_HTML), GREY), "nothing"), \
            "the copy found nothing"
    else:
        tag1 = thumbs.tag(image_file(root, first["path"]), "came first")[0]
        found = (f'the copy found <b>{esc(first.get("title") or first["path"])}</b> first '
                 f'(score {f["score"]:.3f})')
    tag2 = thumbs.tag(image_file(root, orig["path"]), "the original")[0]
    rank = f"ranked {f['rank']}" if f["rank"] else f"not in the top {f['depth']}"
    return (f'<div class="card fail"><div class="pics">{img_tag(f["copy"], "transformed copy")}'
            f'<span class="arrow">\u2192</span>{tag1}</div><div class="rank">{found}</div>'
            f'<div class="pics">{tag2}<div>original: <b>{esc(orig.get("title") or orig["path"])}'
            f'</b><br>{esc(rank)}<br><span class="k">{esc(orig["path"])}</span></div></div></div>')


def retrieval_eval_page(path, lines, table, notes, failures, root):
    """retrieve.py --eval --html: the protocol table and its notes, then the copy-detection
    failures. table: (head, rows) as for table_html; failures: dicts of copy (PIL image), first
    and original (manifest rows), score (of first), rank (1-based, None beyond depth), depth."""
    thumbs = Thumbs()
    cards = [failure_card(thumbs, root, f) for f in failures]
    body = (meta_lines(lines) + table_html(*table) + meta_lines(notes) + unreadable_note(thumbs.bad)
            + f"<h2>Copy detection: {len(failures)} failure(s)</h2>\n"
            + meta_lines(["each transformed copy (crop, rotation, colour, JPEG) was searched "
                          "against the whole index; these did not find their original first"])
            + f'<div class="cards">{"".join(cards)}</div>\n')
    write_page(path, "Retrieval evaluation", body)
    return thumbs.bad


# ----------------------------------------------------------------------------- the map

MAP_PIXELS = 5000 * 96 * 96  # thumbnail pixels per map: 5,000 at 96 px or 20,000 at 48 px
SHEET = 4096  # px, a sprite sheet's largest side: within every browser's image limits


def map_cell(n):
    """px per thumbnail on a map of n paintings: 128 up to ~2,800, then fewer so that the page
    stays near 15 MB at any n (48 px at 20,000)."""
    return int(max(32, min(THUMB_HTML, math.sqrt(MAP_PIXELS / max(n, 1)))))


def sprite_sheets(root, paths, cell):
    """The thumbnails packed on a few large JPEGs: a map of 20,000 paintings loads a handful of
    images, not 20,000. Returns (sheets as data URIs, (n, 5) int array [sheet, x, y, w, h] per
    image, '#rrggbb' mean colour per image (drawn when zoomed far out), n unreadable)."""
    per_row = SHEET // cell
    per_sheet = per_row * per_row
    sheets, sp, colours, bad, sheet = [], np.zeros((len(paths), 5), np.int64), [], 0, None
    prog = files.Progress(len(paths), "thumbnails")
    for i, rel in enumerate(paths):
        s, k = divmod(i, per_sheet)
        if k == 0:
            if sheet is not None:
                sheets.append(jpeg_uri(sheet))
            left = min(per_sheet, len(paths) - i)
            sheet = Image.new("RGB", (min(left, per_row) * cell, -(-left // per_row) * cell), GREY)
        im, ok = open_thumbnail(image_file(root, rel), cell)
        bad += not ok
        x, y = (k % per_row) * cell, (k // per_row) * cell
        sheet.paste(im, (x, y))
        sp[i] = s, x, y, im.width, im.height
        r, g, b = im.resize((1, 1), Image.BOX).getpixel((0, 0))
        colours.append(f"#{r:02x}{g:02x}{b:02x}")
        prog.update(1)
    if sheet is not None:
        sheets.append(jpeg_uri(sheet))
    return sheets, sp, colours, bad


def script_json(obj):
    """JSON that is safe inside a <script> element: no '</script>' or '<!--' can close it."""
    return json.dumps(obj, separators=(",", ":")).replace("</", "<\\/").replace("<!--", "<\\!--")


MAP_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
               "#17becf", "#bcbd22", "#393b79", "#7f7f7f")  # Tableau-like: apart on a grey map
OTHER, NONE = "#b0b0b0", "#dddddd"


def short_title(row):
    """A painting's name on the map: its title, else its file name without folder or suffix."""
    return row.get("title") or os.path.splitext(os.path.basename(row["path"]))[0]


def colour_classes(rows, column):
    """(per-row colour index, legend [(value, colour, count)]): the most common values of column
    get MAP_COLOURS, the rest share 'other' (grey), an empty value 'none' (light grey)."""
    values = [r.get(column) or "" for r in rows]
    counts = Counter(v for v in values if v)
    top = [v for v, _ in counts.most_common(len(MAP_COLOURS))]
    if len(counts) > len(top):  # more values than colours: the rest share one
        top = top[:-1]
    legend = [(v, MAP_COLOURS[j], counts[v]) for j, v in enumerate(top)]
    at = {v: j for j, v in enumerate(top)}
    rest = sum(c for v, c in counts.items() if v not in at)
    if rest:
        legend.append((f"other ({len(counts) - len(top)} values)", OTHER, rest))
    if values.count(""):
        legend.append(("(empty)", NONE, values.count("")))
    ids = [at.get(v, len(top)) if v else len(legend) - 1 for v in values]
    return ids, legend


def legend_html(column, legend):
    items = "".join(f'<span class="item" data-v="{esc(v)}"><i style="background:{c}"></i>'
                    f'{esc(v)} <span class="k">{n}</span></span>' for v, c, n in legend)
    return f'<div class="legend"><b>{esc(column)}:</b> {items}</div>'


def map_data(xy, rows, nn, ns, root, color_by=None, generation=None):
    """The map's JSON: positions scaled into 0..1000 (aspect kept), sprites, every manifest
    column, short names, neighbours and their scores, nga.gov pages where known, the colour
    class of each painting (color_by: a column) and the index generation drawn. Returns
    (dict, bad)."""
    n, cell = len(rows), map_cell(len(rows))
    sheets, sp, colours, bad = sprite_sheets(root, [r["path"] for r in rows], cell)
    xy = np.asarray(xy, np.float64)
    lo, span = xy.min(0), max(float(np.ptp(xy, 0).max()), 1e-9)
    xy = (xy - lo) / span * 1000
    cols = list(rows[0])
    links = [data.nga_page_url(r) or "" for r in rows]
    return {"n": n, "cell": cell, "tw": min(80.0, 900 / math.sqrt(n)),
            "xy": np.round(xy, 1).ravel().tolist(), "sp": sp.ravel().tolist(),
            "colour": colours, "cols": cols, "rows": [[r.get(c) or "" for c in cols] for r in rows],
            "by": next((cols.index(c) for c in ("attribution", "artist") if c in cols), -1),
            "nn": [[int(j) for j in r] for r in nn], "ns": [[round(float(s), 3) for s in r]
                                                            for r in ns],
            "links": links if any(links) else None, "sheets": sheets,
            "names": [short_title(r) for r in rows], "generation": generation,
            **colour_data(rows, color_by, cols)}, bad


def colour_data(rows, column, cols):
    if not column:
        return {"cat": None, "legend": None, "colour_col": -1}
    ids, legend = colour_classes(rows, column)
    return {"cat": ids, "legend": [[v, c] for v, c, _ in legend], "colour_col": cols.index(column),
            "legend_n": [n for *_, n in legend], "colour_by": column}


def map_page(path, lines, xy, rows, nn, ns, root, color_by=None, generation=None):
    """retrieve.py --map: the collection on a canvas at the 2-D positions xy (n, 2); rows: the
    manifest rows; nn (n, k) neighbour ids best first, ns their scores; root: the images'
    folder or zip; color_by: a column whose values frame the thumbnails, with a legend;
    generation: the index generation drawn (retrieve.py tells a stale map by it).
    Returns the number of images that no longer decode (grey)."""
    d, bad = map_data(xy, rows, nn, ns, root, color_by, generation)
    legend = legend_html(color_by, [(v, c, k) for (v, c), k in zip(d["legend"], d["legend_n"],
                                                                   strict=True)]) \
        if color_by else ""
    blob = script_json(d)
    uid = "ae-map-" + hashlib.sha1(blob.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    options = "".join(f'<option value="{j}">{esc(c)}</option>' for j, c in enumerate(d["cols"]))
    body = (meta_lines(lines) + unreadable_note(bad) + f'<div class="map" id="{uid}">'
            '<div class="mapbar"><select><option value="-1">any column</option>'
            f'{options}</select><input type="search" placeholder="filter, e.g. Cubism" '
            'aria-label="filter"><span class="count"></span><button class="zin">+</button>'
            '<button class="zout">&minus;</button><button class="reset">reset</button>'
            '<span class="help">drag to pan, wheel or +/&minus; to zoom, click a painting for '
            f'its nearest neighbours</span></div>{legend}<div class="mapwrap"><div class="stage">'
            '<canvas></canvas><div class="tip"></div></div><div class="side"></div></div>'
            f'<script type="application/json" class="data">{blob}</script>'
            f'<script>\n{asset("map.js").replace("__ID__", uid)}</script></div>')
    write_page(path, "Collection map", body)
    return bad
