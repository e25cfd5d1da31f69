"""The synthetic painter: demo paintings whose style, genre and artist are known, stick figures
whose joints are known, and the demo data set's files in the real formats.

Holds no data-set rules (wikiart.py) and no command (`python data.py demo` runs it); nothing
here reads a real painting.

    import painter, numpy as np
    rng = np.random.default_rng(0)
    hands = painter.demo_artists(rng)
    im = painter.demo_painting("Cubism", "portrait", hands[0], rng)    # a PIL image
    figures = painter.demo_figures(im, rng)      # stick figures painted on it, with their joints
"""

import io
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from files import UserError, atomic_write, write_csv
from poses import KEYPOINT_FLIP, SKELETON

# ----------------------------------------------------------------------------- demo figures
# Stick figures with known joints, so that the pose and face search runs offline on the demo:
# a pose family sets the limb angles, forward kinematics gives the joints in torso lengths
# (mid-shoulder to mid-hip = 1, y down, the hips' middle at 0), and a small 3-D head turned by
# a yaw gives the face's five points and which of them show.

POSE_FAMILIES = ("standing", "arms_raised", "sitting", "bending", "walking", "pointing")
# bone lengths in torso lengths: upper arm, forearm, thigh, shin
BONES = {"upper_arm": 0.6, "forearm": 0.5, "thigh": 0.85, "shin": 0.8}
# head points (nose, left eye, right eye, left ear, right ear) around the head's centre, in
# torso lengths: across (the figure's left +), depth (towards where it faces +), down (+)
HEAD = np.array([[0.0, 0.22, 0.07], [0.07, 0.17, -0.02], [-0.07, 0.17, -0.02],
                 [0.16, 0.0, 0.02], [-0.16, 0.0, 0.02]])


def family_angles(family, rng):
    """(arm and leg angles, torso lean, half shoulder and hip widths, head yaw) of a family,
    jittered. Angles in degrees from straight down, + towards the viewer's right; a limb's
    pair is (upper bone, lower bone), both absolute; side views face the viewer's right."""
    def j(deg=12):  # a limb's own jitter, degrees
        return rng.normal(0, deg)

    side, lean = (0.08, 0.05), 0.0
    if family == "standing":
        arms, legs = ((15 + j(), 10 + j()), (-15 + j(), -10 + j())), ((5 + j(4), 5 + j(4)),
                                                                      (-5 + j(4), -5 + j(4)))
        side, yaw = (0.38, 0.2), rng.choice([0.0, 35.0, -35.0])
    elif family == "arms_raised":
        arms = ((155 + j(), 170 + j()), (-155 + j(), -170 + j()))
        legs = ((8 + j(4), 6 + j(4)), (-8 + j(4), -6 + j(4)))
        side, yaw = (0.38, 0.2), rng.choice([0.0, 30.0, -30.0])
    elif family == "sitting":  # side view, thighs forward, shins down
        arms = ((20 + j(), 70 + j()), (10 + j(), 60 + j()))
        legs, yaw = ((85 + j(8), 5 + j(8)), (80 + j(8), 0 + j(8))), 85.0
    elif family == "bending":  # side view, torso leaning forward, arms hanging
        lean, yaw = 50 + j(10), 80.0
        arms, legs = ((5 + j(), 0 + j()), (-5 + j(), 0 + j())), ((-8 + j(4), -8 + j(4)),
                                                                   (-4 + j(4), -4 + j(4)))
    elif family == "walking":  # side view, legs apart, arms swinging against them
        arms, legs = ((-25 + j(8), 5 + j(8)), (25 + j(8), 60 + j(8))), \
            ((28 + j(6), 10 + j(6)), (-22 + j(6), -35 + j(6)))
        yaw = 85.0
    elif family == "pointing":  # frontal, one arm out level, the other down
        arms = ((90 + j(8), 92 + j(8)), (-12 + j(), -8 + j()))
        legs = ((6 + j(4), 6 + j(4)), (-6 + j(4), -6 + j(4)))
        side, yaw = (0.38, 0.2), rng.choice([0.0, 60.0])
    else:
        raise ValueError(f"unknown pose family {family!r} ({', '.join(POSE_FAMILIES)})")
    return arms, legs, lean, side, float(yaw) + rng.normal(0, 5)


def limb(start, angles, lengths):
    """The two joints at the ends of a limb's bones, from its start (x, y) and angles."""
    a, b = np.radians(angles)
    mid = start + lengths[0] * np.array([math.sin(a), math.cos(a)])
    return mid, mid + lengths[1] * np.array([math.sin(b), math.cos(b)])


def demo_pose(rng, family=None, mirror=None, hide=None):
    """(17, 3) keypoints (x, y, confidence 0 or 1) of a random pose in torso lengths, the hips'
    middle at (0, 0), y down. family: one of POSE_FAMILIES (default: drawn); mirror: flipped
    left-right (default: half the time); hide: the joints left out, as a limb hidden behind
    something or cut by the frame (default: one limb a third of the time)."""
    family = family or POSE_FAMILIES[rng.integers(len(POSE_FAMILIES))]
    arms, legs, lean, (ws, wh), yaw = family_angles(family, rng)
    t = math.radians(lean)
    up, across = np.array([math.sin(t), -math.cos(t)]), np.array([math.cos(t), math.sin(t)])
    k = np.zeros((17, 3))
    k[[11, 12], :2] = [wh * across, -wh * across]  # the figure's left hip on the viewer's right
    k[[5, 6], :2] = [up + ws * across, up - ws * across]
    for (s, e, w), ang in zip(((5, 7, 9), (6, 8, 10)), arms, strict=True):
        k[[e, w], :2] = limb(k[s, :2], ang, (BONES["upper_arm"], BONES["forearm"]))
    for (h, kn, an), ang in zip(((11, 13, 15), (12, 14, 16)), legs, strict=True):
        k[[kn, an], :2] = limb(k[h, :2], ang, (BONES["thigh"], BONES["shin"]))
    k[:5] = head_points(up * 1.45, yaw)
    k[5:, 2] = 1.0
    if mirror if mirror is not None else rng.random() < 0.5:
        k = k[list(KEYPOINT_FLIP)] * [-1, 1, 1]
    hidden = hide if hide is not None else demo_hidden(rng)
    k[list(hidden), 2] = 0.0
    return k.astype(np.float32)


def head_points(centre, yaw):
    """(5, 3) nose, eyes, ears (x, y, shown) of a head at centre turned by yaw degrees (+ to
    the viewer's right): seen from the front, orthographically; a point on the far side of the
    head is not shown."""
    c, s = math.cos(math.radians(yaw)), math.sin(math.radians(yaw))
    across, depth, down = HEAD.T
    x = across * c + depth * s  # yaw 0: the figure's left (across +) on the viewer's right
    towards_us = depth * c - across * s
    shown = towards_us > -0.03
    return np.stack([centre[0] + x, centre[1] + down, shown.astype(float)], 1)


def demo_hidden(rng):
    """The joints of one limb a third of the time (an arm, a leg, or both legs), else none."""
    if rng.random() > 1 / 3:
        return ()
    return [(7, 9), (8, 10), (13, 15), (14, 16), (13, 14, 15, 16)][rng.integers(5)]


def draw_figure(im, keypoints, colour, width):
    """A stick figure on a PIL image, in place: the shown limbs as lines `width` px thick, the
    torso filled, a head disc; keypoints (17, 3) in the image's pixels."""
    draw, k = ImageDraw.Draw(im), np.asarray(keypoints, np.float64)
    there = k[:, 2] > 0
    for a, b in SKELETON:
        if a >= 5 and there[a] and there[b]:
            draw.line([tuple(k[a, :2]), tuple(k[b, :2])], fill=colour, width=width)
    for j in np.flatnonzero(there[5:]) + 5:  # round joints
        x, y = k[j, :2]
        draw.ellipse([x - width / 2, y - width / 2, x + width / 2, y + width / 2], fill=colour)
    if there[[5, 6, 11, 12]].all():
        draw.polygon([tuple(k[j, :2]) for j in (5, 6, 12, 11)], fill=colour)
    head = k[:5][there[:5], :2]
    if len(head):
        (x, y), r = head.mean(0), 2 * width  # ~0.26 torso lengths, as a head is
        if there[[5, 6]].all():  # the neck
            draw.line([tuple(k[[5, 6], :2].mean(0)), (x, y)], fill=colour, width=width)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def demo_figures(im, rng, most=2):
    """Paint 0 to `most` stick figures (random poses, placed and scaled to fit) onto a PIL
    image, in place; returns their figures (box and keypoints in the image's pixels), the
    poses file's entries for this image."""
    figures = []
    for _ in range(int(rng.integers(0, most + 1))):
        k = demo_pose(rng)
        lo, hi = k[:, :2].min(0) - 0.3, k[:, :2].max(0) + 0.3  # + the head disc and limb width
        scale = rng.uniform(0.35, 0.8) * min(im.height / (hi[1] - lo[1]),
                                             im.width / (hi[0] - lo[0]))  # px per torso length
        at = rng.uniform(0, 1, 2) * (np.array(im.size) - scale * (hi - lo)) - scale * lo
        k[:, :2] = k[:, :2] * scale + at
        tone = np.asarray(im.convert("L"), np.float64).mean()
        colour = tuple(int(c) for c in (rng.uniform(0, 60, 3) if tone > 110 else
                                        rng.uniform(190, 255, 3)))
        draw_figure(im, k, colour, max(2, round(0.13 * scale)))
        shown = k[k[:, 2] > 0, :2]
        figures.append({"box": np.concatenate([shown.min(0), shown.max(0)]).astype(np.float32),
                        "keypoints": k, "score": 1.0})
    return figures


# ----------------------------------------------------------------------------- demo data
# A synthetic painter, so the whole pipeline runs offline. Style is the stroke texture,
# genre the composition, artist a palette plus a hand (stroke angle and size) and a liking for
# two styles. Lighting direction is random. A few style labels are deliberately wrong
# (demo/label_noise.csv) so that `crnn.py --eval --outliers` has real label noise to find.

DEMO_STYLES = ["Color_Field_Painting", "Cubism", "Expressionism", "Impressionism",
               "Pointillism", "Ukiyo_e"]
DEMO_GENRES = ["cityscape", "landscape", "portrait", "still_life"]
DEMO_ARTISTS = ["Ines_Kahl", "Leon_Voss", "Mira_Vell", "Oskar_Lund", "Tomas_Greer", "Yara_Benn"]


def demo_artists(rng):
    hands = []
    for i, name in enumerate(DEMO_ARTISTS):
        hands.append({
            "name": name,
            "slug": name.lower().replace("_", "-"),
            "palette": rng.uniform(20, 235, size=(4, 3)),
            "angle": rng.uniform(0, math.pi),
            "scale": rng.uniform(0.7, 1.4),
            "styles": [i % len(DEMO_STYLES), (i + 2) % len(DEMO_STYLES)],
        })
    hands[2]["slug"] = "mirã¨-vell"  # mojibake, as 709 real WikiArt names are
    return hands


def demo_layout(genre, h, w, rng):
    """Region map (h, w) of ids 0..3 for a composition."""
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w]).reshape(2, 1, 1)
    m = np.zeros((h, w), np.int64)
    if genre == "landscape":
        horizon = rng.uniform(0.35, 0.65) + 0.05 * np.sin(x * rng.uniform(3, 9) + rng.uniform(0, 6))
        m[y > horizon] = 1
        cx, cy = rng.uniform(0.15, 0.85), rng.uniform(0.1, 0.3)
        m[(x - cx) ** 2 + (y - cy) ** 2 < 0.006] = 2
    elif genre == "portrait":
        cx = rng.uniform(0.4, 0.6)
        m[((x - cx) / 0.17) ** 2 + ((y - 0.36) / 0.22) ** 2 < 1] = 2
        m[(y > 0.62) & (np.abs(x - cx) < 0.18 + (y - 0.62) * 0.9)] = 1
    elif genre == "still_life":
        table = rng.uniform(0.55, 0.7)
        m[y > table] = 1
        for _ in range(rng.integers(2, 5)):
            cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.06, 0.12)
            m[((x - cx) / r) ** 2 + ((y - table + r * 0.8) / r) ** 2 < 1] = int(rng.integers(2, 4))
    else:  # cityscape: buildings on a street
        street = rng.uniform(0.75, 0.88)
        x0 = 0.0
        while x0 < 1:
            bw, top = rng.uniform(0.08, 0.2), rng.uniform(0.2, 0.6)
            m[(x >= x0) & (x < x0 + bw) & (y > top)] = int(rng.integers(1, 3))
            x0 += bw + rng.uniform(0, 0.04)
        m[y > street] = 3
    return m


def demo_strokes(base, rng, n, length, width, angle=None, jitter=25.0, canvas=None):
    """Draw n short strokes coloured from `base` at their start point."""
    h, w, _ = base.shape
    im = Image.fromarray(canvas if canvas is not None else base.astype(np.uint8))
    draw = ImageDraw.Draw(im)
    ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
    angles = rng.uniform(0, math.pi, n) if angle is None else angle + rng.normal(0, 0.25, n)
    cols = np.clip(base[ys, xs] + rng.normal(0, jitter, (n, 3)), 0, 255).astype(int)
    for y0, x0, a, c in zip(ys, xs, angles, cols, strict=True):
        dx, dy = math.cos(a) * length / 2, math.sin(a) * length / 2
        if width <= 2.5:  # dots and thin strokes
            draw.ellipse([x0 - width, y0 - width, x0 + width, y0 + width], fill=tuple(c))
        else:
            draw.line([x0 - dx, y0 - dy, x0 + dx, y0 + dy], fill=tuple(c), width=int(width))
    return np.asarray(im, np.float64)


def demo_render(style, base, regions, hand, rng):
    """Paint the flat base (h, w, 3) in a style: the texture is what the style means."""
    h, w, _ = base.shape
    s = hand["scale"]
    blur = np.asarray(Image.fromarray(base.astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(4)), np.float64)
    if style == "Color_Field_Painting":
        return blur + rng.normal(0, 3, base.shape)
    if style == "Impressionism":
        return demo_strokes(blur, rng, int(h * w / 18), 7 * s, 3, None, 30, blur.astype(np.uint8))
    if style == "Expressionism":
        sat = np.clip((blur - blur.mean(2, keepdims=True)) * 1.8 + blur.mean(2, keepdims=True),
                      0, 255)
        return demo_strokes(sat, rng, int(h * w / 45), 22 * s, 5, hand["angle"], 35,
                            sat.astype(np.uint8))
    if style == "Pointillism":
        paper = np.full(base.shape, 235, np.uint8)
        return demo_strokes(blur, rng, int(h * w / 5), 0, 1.6, None, 55, paper)
    if style == "Cubism":
        seeds = rng.uniform(0, 1, (int(40 * s), 2)) * [h, w]
        yy, xx = np.mgrid[0:h, 0:w]
        d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
        facet = d.argmin(-1)
        out = np.zeros_like(base)
        for f in range(len(seeds)):
            sel = facet == f
            if sel.any():
                out[sel] = base[sel].mean(0) * rng.uniform(0.75, 1.15)
        edge = (np.diff(facet, axis=0, prepend=facet[:1]) != 0) | \
               (np.diff(facet, axis=1, prepend=facet[:, :1]) != 0)
        out[edge] *= 0.35
        return out
    # Ukiyo_e: flat colours, black outlines on region borders, warm paper grain
    edge = (np.diff(regions, axis=0, prepend=regions[:1]) != 0) | \
           (np.diff(regions, axis=1, prepend=regions[:, :1]) != 0)
    edge = np.asarray(Image.fromarray(edge.astype(np.uint8) * 255).filter(
        ImageFilter.MaxFilter(3))) > 0
    out = np.round(base / 48) * 48 * 0.85 + np.array([38, 30, 12]) + rng.normal(0, 4, base.shape)
    out[edge] = 20
    return out


def demo_painting(style, genre, hand, rng, short=160):
    aspect = rng.uniform(0.75, 1.33)
    h, w = (short, int(short * aspect)) if aspect >= 1 else (int(short / aspect), short)
    regions = demo_layout(genre, h, w, rng)
    palette = hand["palette"][rng.permutation(4)] + rng.normal(0, 12, (4, 3))
    base = palette[regions]
    theta = rng.uniform(0, 2 * math.pi)  # lighting from a random side
    yy, xx = np.mgrid[0:h, 0:w]
    light = 1 + 0.35 * ((xx / w - 0.5) * math.cos(theta) + (yy / h - 0.5) * math.sin(theta))
    base = np.clip(base * light[..., None], 0, 255)
    out = demo_render(style, base, regions, hand, rng)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def write_demo_lists(lists, items, noise):
    """The ArtGAN list formats: CRLF `path,label` for style and genre, the artist lists'
    header + blank line + `path,,label` (LF), and `<idx> <Name>` class files."""
    os.makedirs(lists, exist_ok=True)
    for task, names in (("style", DEMO_STYLES), ("genre", DEMO_GENRES),
                        ("artist", DEMO_ARTISTS)):
        name = "style_class.txt" if task == "style" else f"{task}_class"
        atomic_write(os.path.join(lists, name), "".join(f"{i} {n}\n" for i, n in enumerate(names)))
        for split in ("train", "val"):
            sel = [it for it in items if it[f"{task}_split"] == split and it[task] is not None]
            if task == "artist":
                head = "(Path to image),, (Groundtruth class)" + (" " if split == "train" else "")
                text = head + "\n\n" + "".join(f"{it['path']},,{it['artist']}\n" for it in sel)
                atomic_write(os.path.join(lists, f"artist_{split}"), text)
            else:
                labels = [noise.get(it["path"], it["style"]) if task == "style" else it[task]
                          for it in sel]
                text = "".join(f"{it['path']},{y}\r\n" for it, y in zip(sel, labels, strict=True))
                atomic_write(os.path.join(lists, f"{task}_{split}.csv"), text)


def demo_tail_sizes(n, ratio):
    """Class sizes falling geometrically, largest : smallest = ratio, summing to n (largest
    remainders), each at least 1: n 360, ratio 100 -> 218, 87, 34, 14, 5, 2."""
    k = len(DEMO_STYLES)
    share = ratio ** (-np.arange(k) / (k - 1))
    raw = n * share / share.sum()
    sizes = np.maximum(np.floor(raw).astype(int), 1)
    for c in np.argsort(-(raw - np.floor(raw)), kind="stable")[:max(0, n - sizes.sum())]:
        sizes[c] += 1
    return sizes


def demo_tail_styles(n, ratio, rng):
    """--tail: the style of each of n images, exact geometric class sizes in a seeded order of
    the styles (the rarest is not always the same one), shuffled."""
    if n < len(DEMO_STYLES) or ratio < 1:
        raise UserError(f"--tail {ratio} --n {n}: need a ratio >= 1 and at least "
                        f"{len(DEMO_STYLES)} images (one per style)")
    order = rng.permutation(len(DEMO_STYLES))
    styles = np.repeat(order, demo_tail_sizes(n, ratio))
    return rng.permutation(styles).tolist()


def demo_pick(i, hands, tail, rng):
    """(artist, style) of image i. Balanced demo: artists take turns and paint one of their two
    styles 80% of the time. --tail: the style is given, and 80% of the time painted by one of
    the two artists who favour it."""
    if tail is None:
        a = i % len(hands)
        st = int(rng.choice(hands[a]["styles"])) if rng.random() < 0.8 else \
            int(rng.integers(len(DEMO_STYLES)))
        return a, st
    st = tail[i]
    fans = [a for a, h in enumerate(hands) if st in h["styles"]]
    return (int(rng.choice(fans)) if rng.random() < 0.8 else int(rng.integers(len(hands)))), st


def write_if_changed(dest, im):
    """Saves im as a q90 JPEG at dest unless dest holds those very bytes; 1 if it did."""
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    if os.path.isfile(dest):
        with open(dest, "rb") as f:
            if f.read() == buf.getvalue():
                return 1
    atomic_write(dest, buf.getvalue(), "wb")
    return 0


def scan_files(root):
    """Relative paths (os.sep) of every file under root."""
    return [os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root)
            for f in files]


def write_demo_gallery(out, items):
    """An NGA-style manifest over the same images, for retrieve.py."""
    rows = []
    for i, it in enumerate(items):
        artist = DEMO_ARTISTS[it["artist"] if it["artist"] is not None else i % 6]
        rows.append([it["path"], str(100000 + i), f"Synthetic {DEMO_GENRES[it['shown']]} {i}",
                     artist.replace("_", " "), str(1850 + i % 100), "", DEMO_STYLES[it["style"]],
                     DEMO_GENRES[it["genre"]] if it["genre"] is not None else ""])
    write_csv(os.path.join(out, "gallery.csv"), ["path", "objectid", "title", "attribution",
                                                 "displaydate", "url", "style", "genre"], rows)
