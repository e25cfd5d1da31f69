"""COCO's 17 person keypoints: their names, mirror pairs and skeleton, and keypoint files read
and written (COCO keypoint JSON, or a plain list as MMPose and OpenPose results convert to).

Holds no detector and no pose descriptors (aspects.py) and no drawing (pages.py, painter.py).

    import poses
    figures = poses.read_poses("poses.json")     # {relative image path: [{box, keypoints, score}]}
    poses.write_poses("poses.json", figures)     # COCO keypoints that read_poses reads back
"""

import json
import os
import posixpath

import numpy as np

from files import UserError, atomic_write, one_line, unsafe_path

# ----------------------------------------------------------------------------- pose keypoints
# COCO's person keypoints: 17 joints, each (x, y, v) in image pixels, v 0 = not labelled, 1 =
# labelled but hidden, 2 = visible. "left" is the figure's own left (on the viewer's right when
# it faces us). In memory a figure is {"box": [x0, y0, x1, y1], "keypoints": (17, 3) float32
# (x, y, confidence in [0, 1]), "score"}: v 0, 1, 2 read as confidence 0, 0.5, 1 (a labelled
# hidden joint still has a known place) and aspects.py counts a joint as there from 0.5 up.

KEYPOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
             "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
             "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle")
# each joint's mirror partner: a figure flipped left-right is x -> -x with these labels swapped
KEYPOINT_FLIP = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)
# the limbs drawn between joints, 0-based (COCO's files list the same pairs 1-based)
SKELETON = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6),
            (5, 7), (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5),
            (4, 6))
V_CONFIDENCE = (0.0, 0.5, 1.0)  # COCO's v 0, 1, 2 as a confidence


def read_poses(path):
    """{relative image path: [figure, ...]} from a COCO keypoint file (`images` with id and
    file_name, `annotations` with image_id and keypoints) or from a plain list of {"file_name"
    or "path", "keypoints"}, one figure each, as MMPose and OpenPose results convert to. An
    image listed without annotations maps to []. Anything malformed is one line."""
    if not os.path.isfile(path):
        raise UserError(f"poses file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise UserError(f"{path}: not JSON ({one_line(e)})") from None
    if isinstance(doc, dict) and isinstance(doc.get("annotations"), list):
        return coco_figures(doc, path)
    if isinstance(doc, list):
        return listed_figures(doc, path)
    raise UserError(f"{path}: neither COCO keypoints (images + annotations lists) nor a list "
                    "of {file_name, keypoints}")


def coco_figures(doc, path):
    names, out = {}, {}
    images = doc.get("images")
    if not isinstance(images, list):
        raise UserError(f"{path}: COCO keypoints need an images list (id, file_name)")
    for i, im in enumerate(images):
        if not isinstance(im, dict) or not isinstance(im.get("id"), int | str):
            raise UserError(f"{path}: images[{i}] has no id")
        names[im["id"]] = pose_path(im.get("file_name"), path, f"images[{i}]")
        out.setdefault(names[im["id"]], [])
    for i, ann in enumerate(doc["annotations"]):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if not isinstance(image_id, int | str) or image_id not in names:
            raise UserError(f"{path}: annotations[{i}]: image_id {image_id!r} is not in images")
        out[names[image_id]].append(figure_from(ann, path, f"annotations[{i}]"))
    return out


def listed_figures(doc, path):
    out = {}
    for i, ann in enumerate(doc):
        if not isinstance(ann, dict):
            raise UserError(f"{path}: entry {i} is not an object with file_name and keypoints")
        rel = pose_path(ann.get("file_name", ann.get("path")), path, f"entry {i}")
        out.setdefault(rel, []).append(figure_from(ann, path, f"entry {i}"))
    return out


def pose_path(name, path, where):
    """An image's path as the index spells it: relative, '/'-separated, no './'."""
    why = unsafe_path(name) if isinstance(name, str) else "needs a file_name"
    if why:
        raise UserError(f"{path}: {where}: {why}" + (f": {name!r}" if name else ""))
    return posixpath.normpath(name.replace("\\", "/"))


def figure_from(ann, path, where):
    """One figure from an annotation: keypoints as 51 numbers or 17 (x, y, v) triples, or 17
    (x, y) pairs with MMPose's keypoint_scores; bbox [x, y, w, h] (else the joints' extent);
    score (else 1)."""
    k = keypoint_array(ann, path, where)
    box = ann.get("bbox")
    if box is not None:
        try:
            x, y, w, h = (float(c) for c in box)
        except (TypeError, ValueError):
            raise UserError(f"{path}: {where}: bbox must be [x, y, width, height]") from None
        box = [x, y, x + w, y + h]
    else:
        there = k[k[:, 2] > 0, :2]
        box = [*there.min(0), *there.max(0)] if len(there) else [0.0] * 4
    score = ann.get("score", 1.0)
    if not isinstance(score, int | float) or isinstance(score, bool):
        raise UserError(f"{path}: {where}: score must be a number")
    return {"box": np.asarray(box, np.float32), "keypoints": k, "score": float(score)}


def keypoint_array(ann, path, where):
    """(17, 3) float32 (x, y, confidence) from an annotation's keypoints."""
    scores = ann.get("keypoint_scores")
    bad = f"{path}: {where}: keypoints must be 17 (x, y, v) triples (51 numbers)"
    try:
        k = np.asarray(ann.get("keypoints"), np.float64)
        if scores is not None:  # MMPose: (x, y) pairs, scores apart
            k = np.concatenate([k.reshape(17, 2), np.asarray(scores, np.float64).reshape(17, 1)],
                               1)
        k = k.reshape(17, 3)
    except (TypeError, ValueError):
        raise UserError(bad + (" or 17 (x, y) pairs with 17 keypoint_scores" if scores
                               is not None else "")) from None
    if not np.isfinite(k).all():
        raise UserError(f"{path}: {where}: keypoints must be finite numbers")
    if scores is not None:
        if ((k[:, 2] < 0) | (k[:, 2] > 1)).any():
            raise UserError(f"{path}: {where}: keypoint_scores must lie in [0, 1]")
    elif not np.isin(k[:, 2], (0, 1, 2)).all():
        raise UserError(f"{path}: {where}: a keypoint's v must be 0, 1 or 2 (COCO), not "
                        f"{k[~np.isin(k[:, 2], (0, 1, 2)), 2][0]:g}")
    else:
        k[:, 2] = np.asarray(V_CONFIDENCE)[k[:, 2].astype(int)]
    return k.astype(np.float32)


def write_poses(path, poses):
    """COCO keypoint JSON that read_poses reads back, from {relative path: [figure, ...]}:
    one image per path, one annotation per figure. A confidence is written as v 2 from 0.75
    up, 1 from 0.5, else 0 (at x = y = 0, as COCO writes unlabelled joints)."""
    images, anns = [], []
    for i, (rel, figures) in enumerate(sorted(poses.items()), 1):
        images.append({"id": i, "file_name": rel})
        anns += [coco_annotation(f, i, len(anns) + j + 1) for j, f in enumerate(figures)]
    person = {"id": 1, "name": "person", "supercategory": "person",
              "keypoints": list(KEYPOINTS), "skeleton": [[a + 1, b + 1] for a, b in SKELETON]}
    doc = {"info": {"description": "person keypoints, written by ArtExtract"},
           "images": images, "annotations": anns, "categories": [person]}
    atomic_write(path, json.dumps(doc, separators=(",", ":")) + "\n")


def coco_annotation(figure, image_id, ann_id):
    k = np.asarray(figure["keypoints"], np.float64)
    v = np.where(k[:, 2] >= 0.75, 2, np.where(k[:, 2] >= 0.5, 1, 0))
    xy = np.where(v[:, None] > 0, np.round(k[:, :2], 2), 0.0)
    x0, y0, x1, y1 = (round(float(c), 2) for c in figure["box"])
    flat = [c for (x, y), vis in zip(xy.tolist(), v.tolist(), strict=True) for c in (x, y, vis)]
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
            "keypoints": flat, "num_keypoints": int((v > 0).sum()),
            "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
            "area": round((x1 - x0) * (y1 - y0), 2), "score": round(figure.get("score", 1.0), 4)}
