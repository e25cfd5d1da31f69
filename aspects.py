"""Aspects of a painting besides its content: its figures' poses and faces, its light, its layout.

Holds the keypoint detector, pose and face descriptors, spatial verification, and the model-free
light and layout vectors; no FAISS, no index folder and no command line (retrieve.py does those).

    import aspects
    model = aspects.load_detector("coco", min_size=512)   # or "none" (random init), or a PATH
    figures = aspects.detect(model, [image], device)[0]   # [{box, keypoints (17, 3), score}]
    xb = aspects.pose_vectors(K)                   # (n, 70) index rows: inner product with
    xq = aspects.query_rows(Kq, mirror=True)       # these = a masked score (FAISS IndexFlatIP)
    s = aspects.pose_similarity(q, K, mirror=True) # exact, on the joints both figures show
    score, T = aspects.verify(query_K, [K_1, K_2, ...], mirror=True)  # one similarity transform
    yaw, roll, cls = aspects.face_orientation(K)   # degrees, + to the viewer's right; a class
    f = aspects.light_features(thumb); aspects.light_summary(f)  # "light from the upper left, ..."
    aspects.light_vector(f), aspects.layout_vector(thumb)

Keypoints are COCO's 17 (poses.KEYPOINTS): (x, y, confidence) in image pixels, y down, "left"
the figure's own left. A joint counts where its confidence is >= MIN_CONF; the others are
masked out of every comparison, never read as a joint at (0, 0).
"""

import math
import urllib.error

import numpy as np
from PIL import Image

import files
from files import UserError, one_line
from poses import KEYPOINT_FLIP

MIN_CONF = 0.5  # a joint counts from here: COCO's v 1 and 2, a detector logit of 0 and up
FLIP = np.array(KEYPOINT_FLIP)
TORSO = [5, 6, 11, 12]  # shoulders and hips
# (joint, joint, typical length in torso lengths, mid-shoulder to mid-hip = 1): a bone turned
# away from the picture plane only looks shorter, so the largest ratio seen is the figure's size
SIZE_BONES = np.array([(5, 6, 0.75), (11, 12, 0.4), (5, 11, 1.0), (6, 12, 1.0), (5, 7, 0.6),
                       (6, 8, 0.6), (7, 9, 0.5), (8, 10, 0.5), (11, 13, 0.85), (12, 14, 0.85),
                       (13, 15, 0.8), (14, 16, 0.8)])
CLIP = 4.0  # torso lengths: a stray joint further from the centre than this is held there
MIN_SHARED = 4  # joints two figures must both show to be compared at all
ROT_FREE = 25.0  # degrees a figure may be turned in the picture and still be the same pose


# ----------------------------------------------------------------------------- pose descriptors

def as_figures(K):
    """(n, 17, 3) float64 from one figure (17, 3) or many."""
    K = np.asarray(K, np.float64)
    return K[None] if K.ndim == 2 else K


def mirrored(K):
    """The figures (17, 3) or (n, 17, 3) flipped left-right: x -> -x, and each joint takes its
    partner's label (a mirrored left wrist is a right wrist). Same shape as K."""
    K = np.asarray(K, np.float64)
    K = K[..., FLIP, :].copy()
    K[..., 0] *= -1
    return K


def body_size(K, there):
    """(n,) each figure's size in pixels per torso length: its largest bone over that bone's
    typical length (SIZE_BONES); twice the joints' RMS spread where no bone shows."""
    a, b, typical = SIZE_BONES[:, 0].astype(int), SIZE_BONES[:, 1].astype(int), SIZE_BONES[:, 2]
    seen = there[:, a] & there[:, b]
    length = np.linalg.norm(K[:, a, :2] - K[:, b, :2], axis=-1) / typical
    size = np.where(seen, length, 0).max(1)
    n = np.maximum(there.sum(1), 1)
    mean = (K[..., :2] * there[..., None]).sum(1) / n[:, None]
    spread = np.sqrt((((K[..., :2] - mean[:, None]) ** 2).sum(-1) * there).sum(1) / n)
    return np.maximum(np.where(size > 0, size, 2 * spread), 1e-6)


def normalise_pose(K, min_conf=MIN_CONF):
    """(P (n, 17, 2), there (n, 17)): each figure's joints about its torso's centre in torso
    lengths (body_size), clipped to +-CLIP; joints below min_conf are `there` False, 0 in P."""
    K = as_figures(K)
    there = K[..., 2] >= min_conf
    size = body_size(K, there)
    P = (K[..., :2] - torso_centre(K, there, size)[:, None]) / size[:, None, None]
    return np.where(there[..., None], np.clip(P, -CLIP, CLIP), 0.0), there


def torso_centre(K, there, size):
    """(n, 2): halfway between the shoulders' middle and the hips'. Where only one pair shows
    (a half-length portrait), the other is taken half a torso straight below or above it, so
    that hiding the legs does not move the centre; without either, the joints' mean."""
    def middle(idx):
        t = there[:, idx]
        return (K[:, idx, :2] * t[..., None]).sum(1) / np.maximum(t.sum(1), 1)[:, None], t.any(1)
    (sh, has_sh), (hip, has_hip) = middle([5, 6]), middle([11, 12])
    down = np.stack([np.zeros_like(size), size / 2], 1)
    centre = np.where(has_sh[:, None], sh + down, hip - down)
    centre = np.where((has_sh & has_hip)[:, None], (sh + hip) / 2, centre)
    return np.where((has_sh | has_hip)[:, None], centre, middle(list(range(17)))[0])


# Candidate generation: FAISS finds figures by the inner product of a query row with the index
# rows, and the two rows are built so that the product is the masked score
#     sum over the joints BOTH show of (POSE_TAU**2 - |p_j - q_j|**2), over (k_q POSE_TAU**2):
# a joint closer than POSE_TAU (torso lengths) adds, one further off takes away, a joint either
# figure hides adds nothing; 1 is all k_q of the query's joints right on. Expanding the square,
# index rows are [p (34), there (17), there |p|^2 (17)] and query rows [2 q, there (tau^2 -
# |q|^2), -there] / (k_q tau^2): an asymmetric inner product (FAISS IndexFlatIP, HNSW-IP).
# Zeros for hidden joints with an L2-normalised row would instead read as joints at the
# torso's centre, and figures hiding the same limbs would find each other first.
# Turns: both sides are first stood up (upright: the turn that best lays the joints shown onto
# TEMPLATE, a figure standing; a turned copy of a figure stands up to the same joints), so a
# query no longer has to search turned by every angle in the picture plane; the turn taken off
# is kept as 2 more columns [cos a, sin a] x [cos b, sin b] ANGLE_WEIGHT: a figure lying down
# stays another pose than one standing (0.15 at 90 degrees, 0.01 at 20). QUERY_TURNS absorbs
# what the stand-up angle moves when joints are hidden or jittered; a mirror asked for doubles
# the rows. Each hit keeps its best score.
#   Measured (the 100k synthetic figures of bench.py, 300 queries turned up to 20 degrees,
#   mirrored half the time, jittered, 0-3 joints dropped; 40% of the gallery lying down): the
#   source figure among the candidates (top 200 a row) 0.89 with 6 rows (3 turns x mirror)
#   against 0.81 with the 10 rows of the turns -20..20 before it.
POSE_TAU = 0.5
POSE_DIM = 17 * 4 + 2
ANGLE_WEIGHT = 0.15
QUERY_TURNS = (-6.0, 0.0, 6.0)
# a figure standing, facing us, arms down, in torso lengths about the torso's centre (y down,
# its left on the viewer's right); left-right symmetric, so a mirror image stands up mirrored
# how much each joint's place decides the turn: the trunk and head, which a pose moves little;
# the limbs, which are the pose, only where nothing else shows
UPRIGHT_WEIGHT = np.array([0.5] * 5 + [1.0, 1.0] + [0.1] * 4 + [1.0, 1.0] + [0.1] * 4)
TEMPLATE = np.array([(0, -0.95), (0.07, -1.03), (-0.07, -1.03), (0.14, -0.98), (-0.14, -0.98),
                     (0.35, -0.5), (-0.35, -0.5), (0.42, 0.05), (-0.42, 0.05), (0.45, 0.55),
                     (-0.45, 0.55), (0.18, 0.5), (-0.18, 0.5), (0.2, 1.35), (-0.2, 1.35),
                     (0.2, 2.15), (-0.2, 2.15)])


def turned(P, there, radians):
    """P (n, 17, 2) turned about the torso's centre by radians (n,) or one angle (+ clockwise
    as seen, y down); hidden joints stay 0."""
    z = (P[..., 0] + 1j * P[..., 1]) * np.exp(1j * np.reshape(radians, (-1, 1)))
    return np.stack([z.real, z.imag], -1) * there[..., None]


def upright(P, there):
    """(P stood up, the turn a (n,) radians that did it): the turn that best lays each figure's
    joints shown onto TEMPLATE, weighted by UPRIGHT_WEIGHT (least squares in the complex plane:
    the angle of sum w conj(p) t).
    A figure turned by d stands up to the same joints with a - d."""
    z = (P[..., 0] + 1j * P[..., 1]) * there
    c = (np.conj(z) * (TEMPLATE[:, 0] + 1j * TEMPLATE[:, 1]) * UPRIGHT_WEIGHT).sum(1)
    a = np.where(np.abs(c) > 1e-9, np.angle(c), 0.0)
    return turned(P, there, a), a


def pose_vectors(K, min_conf=MIN_CONF):
    """(n, POSE_DIM) float32 index rows of the figures K (n, 17, 3)."""
    P, there = normalise_pose(K, min_conf)
    P, a = upright(P, there)
    sq = (P ** 2).sum(-1)
    return np.concatenate([P.reshape(len(P), 34), there, there * sq, np.cos(a)[:, None],
                           np.sin(a)[:, None]], 1).astype(np.float32)


def pose_queries(K, mirror=False, rotate=0.0, min_conf=MIN_CONF):
    """(n, POSE_DIM) float32 query rows of the figures K, flipped left-right (mirror), stood up,
    then turned by rotate degrees (+ clockwise as seen) about the torso's centre. The product
    with an index row: (1 - ANGLE_WEIGHT) x the masked score + ANGLE_WEIGHT x the cosine of the
    angle between the two figures as painted; 1 at most."""
    P, there = normalise_pose(mirrored(as_figures(K)) if mirror else K, min_conf)
    P, a = upright(P, there)
    P, a = turned(P, there, math.radians(rotate)), a + math.radians(rotate)
    sq, tau2 = (P ** 2).sum(-1), POSE_TAU ** 2
    x = np.concatenate([2 * P.reshape(len(P), 34), there * (tau2 - sq), -1.0 * there], 1)
    x *= (1 - ANGLE_WEIGHT) / np.maximum(there.sum(1, keepdims=True), 1) / tau2
    return np.concatenate([x, ANGLE_WEIGHT * np.stack([np.cos(a), np.sin(a)], 1)],
                          1).astype(np.float32)


def query_rows(K, mirror=False, turns=QUERY_TURNS):
    """(n * len(turns) * (2 if mirror else 1), POSE_DIM): every figure's query rows,
    figure-major; search them all at once and take, per figure, the best score of each hit."""
    rows = [pose_queries(K, m, t) for m in ((False, True) if mirror else (False,))
            for t in turns]
    return np.stack(rows, 1).reshape(-1, POSE_DIM)


def pose_similarity(q, K, mirror=False, min_conf=MIN_CONF):
    """(n,) exact similarity in [-1, 1] of the query figure q (17, 3) to each figure of K
    (n, 17, 3), for re-ranking: on the joints both show, each side centred and scaled to unit
    RMS (translation and size removed), the correlation of the two joint sets (1: the same
    pose; turns up to ROT_FREE free), times the share of q's joints that the figure shows too
    (few joints in common are weak evidence); -1 below MIN_SHARED joints in common. mirror:
    also q flipped, the better of the two."""
    q, K = as_figures(q)[0], as_figures(K)
    s = masked_correlation(q, K, min_conf)
    return np.maximum(s, masked_correlation(mirrored(q), K, min_conf)) if mirror else s


def masked_correlation(q, K, min_conf):
    """The correlation of the joints both show, centred, as complex numbers x + iy: its
    modulus is the fit after the best rotation, its angle that rotation; a turn up to
    ROT_FREE is free, beyond it the fit falls as the cosine of the excess."""
    m = (q[:, 2] >= min_conf)[None] & (K[..., 2] >= min_conf)  # (n, 17): both show it
    k = m.sum(1)
    a = np.where(m, q[None, :, 0] + 1j * q[None, :, 1], 0)
    b = np.where(m, K[..., 0] + 1j * K[..., 1], 0)
    a = (a - a.sum(1, keepdims=True) / np.maximum(k, 1)[:, None]) * m
    b = (b - b.sum(1, keepdims=True) / np.maximum(k, 1)[:, None]) * m
    norm = np.sqrt((np.abs(a) ** 2).sum(1) * (np.abs(b) ** 2).sum(1))
    c = (np.conj(a) * b).sum(1) / np.maximum(norm, 1e-12)
    corr = np.abs(c) * np.cos(np.clip(np.abs(np.angle(c)) - math.radians(ROT_FREE), 0, None))
    share = k / max(int((q[:, 2] >= min_conf).sum()), 1)
    return np.where(k >= MIN_SHARED, corr * share, -1.0)


def image_scores(S, figure_image, weights=None):
    """(images, scores), best first: an image's score is the weighted mean, over the query's
    figures, of each one's best match among that image's figures. S: (m, f) similarity of the
    query's m figures to f candidate figures; figure_image: (f,) the image of each; weights:
    (m,) how much each query figure counts (default: equally; e.g. their sizes)."""
    S, figure_image = np.atleast_2d(S), np.asarray(figure_image)
    if S.shape[1] == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    order = np.argsort(figure_image, kind="stable")
    img = figure_image[order]
    starts = np.flatnonzero(np.r_[True, img[1:] != img[:-1]])
    best = np.maximum.reduceat(S[:, order], starts, axis=1)  # (m, images)
    w = np.ones(len(S)) if weights is None else np.asarray(weights, np.float64)
    score = w @ best / w.sum()
    rank = np.argsort(-score, kind="stable")
    return img[starts][rank], score[rank]


# ----------------------------------------------------------------------------- verification
# One similarity transform (scale, rotation, translation; a reflection when mirror is allowed)
# that carries the query's figures onto a candidate image's figures. In the complex plane it is
# y = a z + b, z a query joint (flipped left-right and relabelled, for the mirrored proposals),
# and the weighted least-squares a, b have a closed form (2-D Umeyama / Procrustes). Each pair
# (query figure, candidate figure) proposes one from the joints both show, refined by
# iteratively reweighted least squares (Cauchy weights: a joint far off counts less); every
# proposal is then scored on all the query's figures, each against its best-fitting candidate
# figure, by soft inlier joints. All proposals of all candidates at once, in numpy.
TOL = 0.2  # inlier distance, in the query figure's torso lengths (scaled by the transform)
IRLS_STEPS = 4
MAX_FIGURES = 8  # per image, the first ones (detect gives them best first)


def verify(query, candidates, mirror=False, tol=TOL, min_conf=MIN_CONF):
    """(scores (N,), transforms (N, 5)) of the query image's figures (m, 17, 3) against each
    candidate image's figures (a list of N arrays (n_i, 17, 3), n_i may be 0). score: the soft
    inlier count (1 at a joint right on, 0 from tol away) over the query's joints, in [0, 1];
    transform: scale, rotation in degrees (+ clockwise as seen, y being down), tx, ty, and
    mirrored (1: x was flipped first, the query's left joints matched to the right ones)."""
    Q = as_figures(query)[:MAX_FIGURES]
    C, cand_fig = pad_figures(candidates)
    if not len(Q) or not C.shape[1]:
        return np.zeros(len(candidates)), np.zeros((len(candidates), 5))
    Zs = [complex_points(Q)] + ([complex_points(mirrored(Q))] if mirror else [])
    Y = complex_points(C)  # (N, F, 17)
    q_there, c_there = Q[..., 2] >= min_conf, (C[..., 2] >= min_conf) & cand_fig[..., None]
    size = body_size(Q, q_there)  # (m,) px per torso length
    best = np.full(len(C), -1.0), np.zeros((len(C), 5))
    for r, Z in enumerate(Zs):
        zt = q_there[:, FLIP] if r else q_there
        n, i, f = np.meshgrid(np.arange(len(C)), np.arange(len(Q)), np.arange(C.shape[1]),
                              indexing="ij")
        n, i, f = n.ravel(), i.ravel(), f.ravel()  # one proposal per (candidate, figure pair)
        ok = (zt[i] & c_there[n, f]).sum(1) >= 2  # two joints fix a similarity transform
        n, i, f = n[ok], i[ok], f[ok]
        a, b = robust_fit(Z[i], Y[n, f], zt[i] & c_there[n, f], tol * size[i])
        keep_best(best, n, inlier_score(a, b, Z, zt, Y[n], c_there[n], size, tol), a, b, r)
    return np.maximum(best[0], 0.0), best[1]


def pad_figures(candidates):
    """(C (N, F, 17, 3), real (N, F)) with F the most figures of any candidate (<= MAX_FIGURES)."""
    F = min(max([len(c) for c in candidates] + [0]), MAX_FIGURES)
    C, real = np.zeros((len(candidates), F, 17, 3)), np.zeros((len(candidates), F), bool)
    for j, c in enumerate(candidates):
        c = as_figures(c)[:F] if len(c) else np.zeros((0, 17, 3))
        C[j, :len(c)], real[j, :len(c)] = c, True
    return C, real


def complex_points(K):
    return K[..., 0] + 1j * K[..., 1]


def similarity_fit(z, y, w):
    """Weighted least squares a, b of y = a z + b over the last axis: a = sum w conj(z') y' /
    sum w |z'|^2 about the weighted means (rotation and scale in one complex number)."""
    sw = np.maximum(w.sum(-1), 1e-12)
    zm, ym = (w * z).sum(-1) / sw, (w * y).sum(-1) / sw
    zc, yc = z - zm[..., None], y - ym[..., None]
    a = (w * np.conj(zc) * yc).sum(-1) / np.maximum((w * np.abs(zc) ** 2).sum(-1), 1e-12)
    return a, ym - a * zm


def robust_fit(z, y, w0, tol_px):
    """a, b fitted on the joints w0, then IRLS_STEPS reweightings: Cauchy weights on each joint's
    residual over the inlier tolerance (tol_px: query pixels, scaled by |a|)."""
    w = w0.astype(np.float64)
    a, b = similarity_fit(z, y, w)
    for _ in range(IRLS_STEPS):
        e = np.abs(y - (a[:, None] * z + b[:, None])) / (np.abs(a) * tol_px + 1e-12)[:, None]
        w = w0 / (1 + e ** 2)
        a, b = similarity_fit(z, y, w)
    return a, b


def inlier_score(a, b, Z, z_there, Y, y_there, size, tol):
    """(H,) each proposal's soft inliers over all the query's joints: every query figure (Z
    (m, 17)) carried by a, b onto its best candidate figure (Y (H, F, 17)). In blocks of
    proposals: (block, m, F, 17) residuals at a time, ~1 M."""
    out, step = np.zeros(len(a)), max(1, 2 ** 20 // (Z.size * Y.shape[1]))
    for lo in range(0, len(a), step):
        s = slice(lo, lo + step)
        moved = a[s, None, None] * Z[None] + b[s, None, None]  # (h, m, 17)
        e = np.abs(moved[:, :, None] - Y[s, None])  # (h, m, F, 17)
        t = (np.abs(a[s])[:, None] * tol * size[None])[..., None, None]  # px in the candidate
        soft = np.clip(1 - (e / np.maximum(t, 1e-12)) ** 2, 0, None)
        soft *= z_there[None, :, None] & y_there[s, None]
        out[s] = soft.sum(-1).max(-1).sum(-1)
    return out / max(int(z_there.sum()), 1)


def keep_best(best, n, score, a, b, mirror):
    """Per candidate, the best proposal's score and transform (in place)."""
    top, T = best
    if not len(n):
        return
    order = np.lexsort((-score, n))  # per candidate, best first
    first = order[np.r_[True, n[order][1:] != n[order][:-1]]]
    better = score[first] > top[n[first]]
    idx, j = n[first][better], first[better]
    top[idx] = score[j]
    T[idx] = np.stack([np.abs(a[j]), np.degrees(np.angle(a[j])), b[j].real, b[j].imag,
                       np.full(len(j), float(mirror))], 1)


def transform_points(T, xy):
    """(k, 2) points xy carried by one transform row of verify (scale, degrees, tx, ty,
    mirrored)."""
    s, deg, tx, ty, mirror = T
    z = np.asarray(xy, np.float64) @ [1, 1j]
    z = -np.conj(z) if mirror else z
    z = s * np.exp(1j * math.radians(deg)) * z + (tx + 1j * ty)
    return np.stack([z.real, z.imag], 1)


# ----------------------------------------------------------------------------- faces
# The head as five points on a rigid 3-D model, in units of half the ear-to-ear distance:
# across (the figure's left +), depth (where the face points +), down (+). Turned by a yaw
# about the vertical axis and seen orthographically, each point lands at x = across cos(yaw) +
# depth sin(yaw) and faces the viewer when depth cos(yaw) - across sin(yaw) > 0. The yaw is
# the one, on a 1-degree grid, whose projection best fits the head points the figure shows
# (position, scale and height fitted in closed form) and agrees with which ones it shows.
# Sign: yaw > 0 turns the face towards the viewer's right (the nose right of the ears), 0 is
# frontal, +-180 the back of the head. Roll is the eye line's (else the ear line's) angle,
# + clockwise as seen.
HEAD_MODEL = np.array([[0.0, 1.5, 0.6], [0.42, 1.2, 0.0], [-0.42, 1.2, 0.0],
                       [1.0, 0.0, 0.2], [-1.0, 0.0, 0.2]])  # nose, eyes, ears
YAW_GRID = np.radians(np.arange(-180, 180))
YAW_CLASSES = ("left", "three-quarter left", "frontal", "three-quarter right", "right", "back")


def face_orientation(K, min_conf=MIN_CONF):
    """(yaw degrees (n,), roll degrees (n,), class names [n]) of each figure's head; NaN and
    None where fewer than two head points show. 'back' when ears show but neither nose nor
    eye (one ear alone: yaw +-135, turned away towards the other side)."""
    K = as_figures(K)
    there = K[:, :5, 2] >= min_conf
    roll = head_roll(K, there)
    yaw = np.full(len(K), np.nan)
    for lo in range(0, len(K), 1024):  # (chunk, 360, 5) costs at a time: ~15 MB each
        sel = slice(lo, lo + 1024)
        yaw[sel] = fit_yaw(K[sel, :5, :2], there[sel], np.nan_to_num(roll[sel]))
    back = there[:, 3:5].any(1) & ~there[:, :3].any(1)
    one_ear = back & np.isnan(yaw)  # turned away past profile, towards the hidden ear's side
    yaw[one_ear] = np.where(there[one_ear, 3], -135.0, 135.0)
    names = [None if np.isnan(y) else "back" if b else yaw_class(y)
             for y, b in zip(yaw, back, strict=True)]
    return yaw, roll, names


def yaw_class(yaw):
    a = abs(yaw)
    if a > 112.5:
        return "back"
    if a <= 22.5:
        return "frontal"
    side = "right" if yaw > 0 else "left"
    return f"three-quarter {side}" if a <= 67.5 else side


def head_roll(K, there):
    """(n,) the angle of the line from the right eye to the left (else ear to ear), folded into
    (-90, 90]: a line has no direction, and a head seen from behind shows its ears swapped."""
    roll = np.full(len(K), np.nan)
    for r, l in ((4, 3), (2, 1)):  # ears, then eyes win where both show
        ok = there[:, r] & there[:, l]
        d = K[ok, l, :2] - K[ok, r, :2]
        d = np.where(d[:, :1] < 0, -d, d)
        roll[ok] = np.degrees(np.arctan2(d[:, 1], d[:, 0]))
    return np.where(roll <= -90, roll + 180, roll)


def fit_yaw(H, there, roll):
    """(n,) degrees: per head (5, 2) points, roll removed, the YAW_GRID yaw of least cost."""
    c, s = np.cos(np.radians(-roll)), np.sin(np.radians(-roll))
    n_pts = there.sum(1)
    mean = (H * there[..., None]).sum(1) / np.maximum(n_pts, 1)[:, None]
    p = H - mean[:, None]
    x, y = p[..., 0] * c[:, None] - p[..., 1] * s[:, None], p[..., 0] * s[:, None] + \
        p[..., 1] * c[:, None]
    across, depth, down = HEAD_MODEL.T
    cy, sy = np.cos(YAW_GRID)[:, None], np.sin(YAW_GRID)[:, None]
    u, toward = across * cy + depth * sy, depth * cy - across * sy  # (360, 5)
    w = there[:, None, :].astype(np.float64)  # (n, 1, 5)
    k = np.maximum(n_pts, 1)[:, None, None]
    uc = u[None] - (w * u).sum(-1, keepdims=True) / k  # model points about their mean
    dc = np.broadcast_to(down - (w * down).sum(-1, keepdims=True) / k, uc.shape)
    num = (w * (uc * x[:, None] + dc * y[:, None])).sum(-1)
    den = (w * (uc ** 2 + dc ** 2)).sum(-1)
    S = num / np.maximum(den, 1e-12)  # the head's scale, px per model unit
    rss = (w * ((x[:, None] - S[..., None] * uc) ** 2 + (y[:, None] - S[..., None] * dc) ** 2)
           ).sum(-1)
    cost = rss / np.maximum(S, 1e-6) ** 2 / k[..., 0]
    cost = cost + 4 * (w * np.clip(-toward - 0.1, 0, None) ** 2).sum(-1)  # shown: must face us
    cost = cost + (~there[:, None] * np.clip(toward - 0.3, 0, None) ** 2).sum(-1)  # hidden: not
    cost = np.where(S > 0, cost, np.inf)
    back = there[:, 3:5].any(1) & ~there[:, :3].any(1)
    cost[back] += np.where(np.abs(YAW_GRID) < math.radians(100), np.inf, 0)
    yaw = np.degrees(YAW_GRID[np.argmin(cost, 1)])
    return np.where(n_pts >= 2, yaw, np.nan)


# a face's vector: yaw as a point on the circle, roll as one at twice its angle (a line's angle
# repeats every 180 degrees); inner product = YAW_SHARE cos(d yaw) + (1 - YAW_SHARE) cos(2 d roll)
YAW_SHARE = 0.8


def face_vectors(K, mirror=False, min_conf=MIN_CONF):
    """(n, 4) float32: zeros where no yaw (such a figure matches no face); an unknown roll
    leaves its part 0. mirror: the flipped figures' (yaw and roll change sign)."""
    yaw, roll, _ = face_orientation(mirrored(as_figures(K)) if mirror else K, min_conf)
    y, r = np.radians(yaw), np.radians(2 * roll)
    v = np.stack([math.sqrt(YAW_SHARE) * np.cos(y), math.sqrt(YAW_SHARE) * np.sin(y),
                  math.sqrt(1 - YAW_SHARE) * np.cos(r), math.sqrt(1 - YAW_SHARE) * np.sin(r)], 1)
    v[np.isnan(roll), 2:] = 0
    return np.nan_to_num(v).astype(np.float32)


# ----------------------------------------------------------------------------- light
# Model-free, from the small thumbnail decoded at build time. light_features keeps the raw
# numbers (stored as they are, so that the weights below can change without a rebuild);
# light_vector weights them into one unit row for an inner-product search:
#   layout    LIGHT_GRID**2 cell means of luminance, minus their mean, over their norm: where
#             light and dark sit, whatever the exposure (a darker photograph is the same row)
#   direction 2: the correlation of that layout with x and with y (+ right, + down): the bright
#             side, i.e. where the light comes from, and how strongly (length <= 1)
#   key       where the median sits between the 5th and 95th percentiles (0: mostly dark with
#             a few lights, low key; 1: high key), and contrast (p95 - p5) / (p95 + p5)
#   warmth    (R - B) / (R + B) over the image: + warm, - cool
LIGHT_GRID = 6
LIGHT_PARTS = {"layout": (slice(0, 36), 1.0), "direction": (slice(36, 38), 0.5),
               "key": (slice(38, 40), 1.0), "warmth": (slice(40, 41), 2.0)}
LIGHT_DIM = 41
LUMA = np.array([0.299, 0.587, 0.114])  # Rec. 601, on the encoded values


def rgb_array(im, side=64):
    """(h, w, 3) float in [0, 1], the image box-filtered to fit side x side."""
    im = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, np.uint8))
    im = im.convert("RGB")
    im = im.reduce(max(1, min(im.size) // side)) if min(im.size) > 2 * side else im
    return np.asarray(im, np.float64) / 255


def light_features(im):
    """(41,) float32 raw light numbers of a PIL image or (H, W, 3) uint8 array (see above)."""
    rgb = rgb_array(im)
    Y = rgb @ LUMA
    cells = np.asarray(Image.fromarray(Y.astype(np.float32)).resize(
        (LIGHT_GRID, LIGHT_GRID), Image.BOX), np.float64)
    z = cells - cells.mean()
    z = z / max(np.linalg.norm(z), 1e-6) if np.ptp(cells) > 1e-3 else np.zeros_like(z)
    g = (np.arange(LIGHT_GRID) + 0.5) / LIGHT_GRID * 2 - 1  # cell centres in [-1, 1]
    gx, gy = np.meshgrid(g, g)
    direction = [(z * gx).sum() / np.linalg.norm(gx), (z * gy).sum() / np.linalg.norm(gy)]
    p5, p50, p95 = np.percentile(Y, [5, 50, 95])
    key = (p50 - p5) / (p95 - p5) if p95 - p5 > 1e-3 else 0.5
    contrast = (p95 - p5) / max(p95 + p5, 1e-6)
    r, b = rgb[..., 0].mean(), rgb[..., 2].mean()
    warmth = (r - b) / max(r + b, 1e-6)
    return np.concatenate([z.ravel(), direction, [key, contrast, warmth]]).astype(np.float32)


def light_vector(F):
    """(n, 41) float32 unit rows (one row for one feature row): the LIGHT_PARTS weighted; key
    and contrast centred on 0.5 first."""
    F = np.atleast_2d(np.asarray(F, np.float64)).copy()
    F[:, 38:40] -= 0.5
    for sl, weight in LIGHT_PARTS.values():
        F[:, sl] *= weight
    return (F / np.maximum(np.linalg.norm(F, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def light_summary(f):
    """One line from light_features, e.g. 'light from the upper left, low key, warm'."""
    dx, dy, key, contrast, warmth = (float(v) for v in f[36:41])
    if math.hypot(dx, dy) < 0.25:
        side = "even light"
    else:
        vert = "upper " if dy < -0.38 * math.hypot(dx, dy) else "lower " if \
            dy > 0.38 * math.hypot(dx, dy) else ""
        horiz = "left" if dx < -0.38 * math.hypot(dx, dy) else "right" if \
            dx > 0.38 * math.hypot(dx, dy) else ""
        side = "light from the " + ((vert + horiz).strip() if horiz else
                                    {"upper ": "top", "lower ": "bottom"}[vert])
    tone = "low key" if key < 0.35 else "high key" if key > 0.65 else "middle key"
    tone += ", strong contrast" if contrast > 0.6 else ", soft contrast" if contrast < 0.2 else ""
    hue = "warm" if warmth > 0.08 else "cool" if warmth < -0.03 else "neutral"
    return f"{side}, {tone}, {hue}"


# ----------------------------------------------------------------------------- layout
# Composition without a model, computed for every image at build time: the fallback for
# `--by layout` where the index has no grid-pooled CNN map. Per cell of a LAYOUT_GRID grid:
# the mean colour in opponent channels (light, red-green, yellow-blue), minus the image's own
# mean and over the norm (where masses and contrasts sit, not the palette), and the energy of
# edges in 4 orientations (horizon, verticals, diagonals) as a share of the image's, square-
# rooted (Hellinger: inner products of square roots compare distributions). Half each.
LAYOUT_GRID = 4
LAYOUT_DIM = LAYOUT_GRID ** 2 * 7


def layout_vector(im):
    """(112,) float32 unit vector of a PIL image or (H, W, 3) uint8 array."""
    rgb = rgb_array(im)
    opp = np.stack([rgb.mean(-1), rgb[..., 0] - rgb[..., 1],
                    (rgb[..., 0] + rgb[..., 1]) / 2 - rgb[..., 2]], -1)
    colour = cell_means(opp) - opp.mean((0, 1))
    colour = colour.ravel() / max(np.linalg.norm(colour), 1e-6)
    L = opp[..., 0]
    gy, gx = np.gradient(L)
    mag, theta = np.hypot(gx, gy), np.mod(np.arctan2(gy, gx), np.pi) / (np.pi / 4)
    lo = np.floor(theta).astype(int) % 4
    frac = theta - np.floor(theta)  # shared linearly between the two nearest of 4 bins
    bins = np.zeros(L.shape + (4,))
    np.put_along_axis(bins, lo[..., None], (mag * (1 - frac))[..., None], -1)
    np.put_along_axis(bins, ((lo + 1) % 4)[..., None], (mag * frac)[..., None], -1)
    edges = cell_means(bins).ravel()
    edges = np.sqrt(edges / max(edges.sum(), 1e-12))
    v = np.concatenate([colour, edges]) / math.sqrt(2)
    return v.astype(np.float32)


def cell_means(a):
    """(LAYOUT_GRID, LAYOUT_GRID, c) means of an (h, w, c) array over a grid of cells."""
    h, w, _ = a.shape
    ys = np.linspace(0, h, LAYOUT_GRID + 1).astype(int)
    xs = np.linspace(0, w, LAYOUT_GRID + 1).astype(int)
    return np.array([[a[ys[i]:ys[i + 1], xs[j]:xs[j + 1]].mean((0, 1))
                      for j in range(LAYOUT_GRID)] for i in range(LAYOUT_GRID)])


# ----------------------------------------------------------------------------- detector
# torchvision's Keypoint R-CNN (ResNet50-FPN, trained on COCO person keypoints): a box and 17
# keypoints per person. torch and torchvision are imported here only, when a detector is used.
DETECTOR = "keypointrcnn_resnet50_fpn"
DETECT_SIZE = 512  # px, the shorter side the detector sees (torchvision's default: 800)
DETECT_THRESHOLD = 0.7  # a person box's score from here
WEIGHTS_FLAG = "--pose-weights"


def load_detector(weights="coco", min_size=DETECT_SIZE, seed=0, flag=WEIGHTS_FLAG):
    """The detector in eval mode. weights: coco (COCO_V1, downloaded once into torch's cache),
    none (random init from seed: tests and timing), or a state_dict PATH. min_size: the shorter
    side it resizes images to (the longer one at most 1333/800 of it)."""
    import torch
    from torchvision.models.detection import keypointrcnn_resnet50_fpn
    state = None if weights == "none" else coco_state_dict(flag) if weights == "coco" else \
        read_detector_state(weights, flag)  # before the model: a bad file fails fast
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                          min_size=min_size, max_size=round(min_size * 1333 / 800))
    if state is not None:
        load_detector_state(model, state, weights, flag)
    return model.eval()


def coco_state_dict(flag=WEIGHTS_FLAG):
    """torchvision's COCO keypoint weights, downloaded once into torch.hub's cache."""
    from torchvision.models.detection import KeypointRCNN_ResNet50_FPN_Weights
    try:  # torch.hub prints 'Downloading: URL to PATH' (once; then it reads its cache)
        return KeypointRCNN_ResNet50_FPN_Weights.COCO_V1.get_state_dict(progress=True)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise UserError(f"cannot download the COCO keypoint weights for {DETECTOR} "
                        f"({one_line(e)}); offline, use {flag} none or {flag} PATH (a "
                        "torchvision state_dict)") from None


def read_detector_state(path, flag=WEIGHTS_FLAG):
    """A state_dict from a local file, loaded as tensors only (files.read_state_dict)."""
    return files.read_state_dict(path, flag, "coco|none")


def load_detector_state(model, state, weights, flag=WEIGHTS_FLAG):
    """The weights into the model, all of them. Built without weights, torchvision's model has
    plain BatchNorms; COCO_V1's frozen ones lack num_batches_tracked, which eval mode never
    reads (the two compute the same there)."""
    try:
        res = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch: another architecture
        raise UserError(f"{flag} {weights}: not a torchvision {DETECTOR} state_dict "
                        f"({one_line(e)})") from None
    bad = [k for k in res.missing_keys if not k.endswith("num_batches_tracked")]
    bad += res.unexpected_keys
    if bad:
        raise UserError(f"{flag} {weights}: not a torchvision {DETECTOR} state_dict ({len(bad)} "
                        f"missing or unexpected keys, e.g. {bad[0]})")


def detect(model, images, device, batch=4, threshold=DETECT_THRESHOLD, most=MAX_FIGURES):
    """Per image, its figures best first: [{box (4,), keypoints (17, 3), score}], in the
    image's pixels, person boxes scoring >= threshold, at most `most`. images: PIL images or
    (H, W, 3) uint8 arrays of any size (the model resizes them to its min_size). A keypoint's
    confidence is its heatmap peak (a logit) through a sigmoid: 0.5 at a logit of 0, near
    Detectron2's default keypoint threshold (0.05)."""
    import torch
    model.roi_heads.score_thresh = threshold  # boxes below it never reach the keypoint head
    model.roi_heads.detections_per_img = most
    model.to(device).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = [image_tensor(im).to(device) for im in images[i:i + batch]]
            out += [figures_of(r) for r in model(x)]
    return out


def image_tensor(im):
    """(3, H, W) float in [0, 1]: the detector normalises by itself."""
    import torch
    a = np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im, np.uint8)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255)


def figures_of(r):
    boxes, scores = r["boxes"].float().cpu().numpy(), r["scores"].float().cpu().numpy()
    k = r["keypoints"].float().cpu().numpy()
    k[..., 2] = 1 / (1 + np.exp(-r["keypoints_scores"].float().cpu().numpy()))
    return [{"box": boxes[j], "keypoints": k[j], "score": float(scores[j])}
            for j in range(len(boxes))]
