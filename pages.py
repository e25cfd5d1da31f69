"""What people look at: fonts, thumbnails, contact sheets and confusion images, drawn with PIL.

Holds no model code and no metrics: callers pass in numbers, labels and image paths.

    import pages
    pages.contact_sheet([[(path, "line 1", "line 2"), ...], ...], "sheet.png")
"""

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

import data

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
    data.atomic_write(path, buf.getvalue(), "wb")


def thumbnail(path, size=THUMB):
    """The image at path fitted into size x size, or a grey square when it does not decode."""
    try:
        return ImageOps.contain(data.load_image(path, size), (size, size))
    except data.DECODE_ERRORS:  # moved, unreadable, or too large to decode
        return Image.new("RGB", (size, size), GREY)


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


def confusion_png(cm, names, title, path):
    """Heat map of row-normalised counts (recall per true class), with counts in the cells."""
    n = len(names)
    cell = max(12, min(44, 900 // max(n, 1)))  # px: 27 WikiArt styles get 33 px cells
    fnt, small = font(13), font(max(8, min(12, cell // 3)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lab = int(min(220, max(probe.textlength(s, font=fnt) for s in names) + 12))
    W, H = lab + n * cell + 20, lab + n * cell + 30
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.text((8, 6), title, fill="black", font=fnt)
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
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
