"""Real-model accuracy on labelled volumes: 2D prompts, the 3D modes and the official 3D baseline.

    python benchmarks/accuracy_eval.py [--model litemedsam|medsam] [--checkpoint FILE]
        [--data ctchest|tumours|brain|abdomen|all | --volume IMAGE --labels SEG [--label-names 1=liver,...]
         [--tumours NAMES]] [--structures "right lung,left lung"]
        [--window model|auto|PRESET|W,L] [--key-every 5] [--cache-dir DIR] [--window-sweep] [--json out.json]

Data (eval_data.py): slicerio's CT chest sample with its expert segmentation, pyradiomics' five
tumour cases (brain and breast MR, lung CT), the Colin27 brain with AAL regions, TotalSegmentator's
abdominal CT and MR; or your own (--volume with --labels, repeatable in pairs: a .seg.nrrd or a label
map; --tumours names the structures that the tumour-end goal counts). Per labelled structure:
  2D med   Dice on the slice of the structure's median voxel, prompted with the truth's tight box;
  2D mean  mean Dice over every slice holding the structure, tight boxes;
  2D jit   the same with boxes jittered as in MedSAM's training (each side moved outward by a
           random 0-20 px at 1024 scale, fixed seed);
  a        grow from one tight box on the median slice (`propagate_from_slice`, default rules);
           also ended where it runs into the other labels that do not surround it
           (`stop_at_protected`): the Slicer effect's growth once those are contoured and the
           editor's editable area protects them (summary line only);
  b        the truth's 3D bounding box (`segment_box3d`);
  c        tight boxes on key slices every N slices plus the last (`segment_key_slices`);
  base     the official LiteMedSAM 3D inference (`MedSAM_infer_npz_3D`), re-implemented here as
           the yardstick: middle slice of the 3D box prompted with the box's extent, up to the
           last slice then down to the first, next box = the previous mask's bounding box +-3 px at
           256 scale (clipped to the padded 256 frame), an empty mask falls back to the 3D box, no
           early stop, no post-processing.
3D Dice and NSD (normalised surface Dice at 2 mm, physical spacing: the challenge's metric) for
each; for mode a also where each direction stopped against the truth's ends ("+n": n slices past
the end, "-n": stopped n slices short; "edge": the truth reaches the volume's edge there, so the
end says nothing about a stop rule; "abuts": the truth continues as another labelled structure
(the vertebral columns are split by anatomical level, which a box cannot see).

Structures made of many separate pieces (largest 3D component under half the voxels: the ribs)
are marked "pieces" and left out of the summary: one box around a ring of ribs is no prompt for a
box-prompted model.

--window model (the default) measures what `segment` does: on CT, LiteMedSAM picks each structure's
window on its seed slice (window_choice.py); other data and ViT-B get choose_window's. --window auto
is choose_window's one window per volume (ct-abdomen on CT).

--window-sweep adds, on CT, the tight-box 2D Dice of each window preset and how well the model's
quality score ranks those windows slice by slice (run it with a model's weights before setting its
family's SCORE_RANKS_QUALITY).

Every slice x window is encoded once: embeddings go to a disk cache (default
~/.cache/medsam-slicer/accuracy-eval), so reruns cost only decoder calls.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
from scipy import ndimage

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "MedSAMSlicer"))

from medsam_slicer.cache import EmbeddingCache  # noqa: E402
from medsam_slicer.predictor import SlicePredictor  # noqa: E402
from medsam_slicer.propagation import (propagate_from_slice, segment_box3d, segment_key_slices,  # noqa: E402
                                       stop_at_protected)
from medsam_slicer.slicing import mask_bbox  # noqa: E402
from medsam_slicer.windowing import CT_PRESETS, choose_window, from_width_level, looks_like_hounsfield  # noqa: E402

from medsam_slicer.window_choice import model_picks_window, pick_window  # noqa: E402

from eval_data import DATASETS, cases, files_case, parse_label_names  # noqa: E402
from medsam_slicer.errors import InputError  # noqa: E402

NSD_TOLERANCE_MM = 2.0
JITTER_1024 = 20  # MedSAM's training jitter: each side 0-20 px outward at 1024 scale
BASELINE_SHIFT_256 = 3  # the official 3D inference's box shift, pixels at 256 scale
SWEEP_WINDOWS = dict(CT_PRESETS, **{"1000/-500": (1000.0, -500.0), "2000/0": (2000.0, 0.0)})


# ---------------------------------------------------------------------------------------------
# metrics


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with a 6-neighbour outside it (the volume's border counts as outside)."""
    padded = np.pad(mask, 1)
    inner = ndimage.binary_erosion(padded, structure=ndimage.generate_binary_structure(3, 1))[1:-1, 1:-1, 1:-1]
    return mask & ~inner


def nsd(pred: np.ndarray, truth: np.ndarray, spacing_kji, tolerance_mm: float = NSD_TOLERANCE_MM) -> float:
    """Normalised surface Dice: the share of both surfaces within `tolerance_mm` of the other one,
    distances in millimetres (anisotropic voxels). Surfaces are boundary voxels (counted, not
    weighted by surfel area as the challenge's surface-distance package does: close, not equal)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if not pred.any() and not truth.any():
        return 1.0
    if not pred.any() or not truth.any():
        return 0.0
    sp, st = _surface(pred), _surface(truth)
    to_truth = ndimage.distance_transform_edt(~st, sampling=spacing_kji)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing_kji)
    close = int((to_truth[sp] <= tolerance_mm).sum()) + int((to_pred[st] <= tolerance_mm).sum())
    return float(close / (sp.sum() + st.sum()))


def extent(mask: np.ndarray) -> Optional[Tuple[int, int]]:
    ks = np.flatnonzero(mask.any(axis=(1, 2)))
    return (int(ks[0]), int(ks[-1])) if len(ks) else None


def median_slice(truth: np.ndarray) -> int:
    """The slice of the structure's median voxel (along k)."""
    ks = np.nonzero(truth)[0]
    return int(np.sort(ks)[len(ks) // 2])


def box3d(truth: np.ndarray):
    return mask_bbox(truth.any(axis=0)), extent(truth)


# ---------------------------------------------------------------------------------------------
# models


def load_engine(model: str, checkpoint: Optional[str], device: str, precision: str):
    from medsam_slicer.engine import MedSAMEngine

    return MedSAMEngine.load(model=model, checkpoint=checkpoint, device=device, precision=precision)


def box_scale(model: str, slice_shape) -> Tuple[float, float]:
    """Slice pixels per model-input pixel at 1024 scale, (x, y): ViT-B MedSAM resizes each axis to
    1024, LiteMedSAM keeps the aspect (longest side)."""
    h, w = slice_shape
    if model == "medsam":
        return w / 1024.0, h / 1024.0
    side = max(h, w)
    return side / 1024.0, side / 1024.0


def jittered_box(box, slice_shape, scale_xy, rng) -> Tuple[int, int, int, int]:
    h, w = slice_shape
    sx, sy = scale_xy
    d = rng.integers(0, JITTER_1024 + 1, size=4)
    x0, y0, x1, y1 = box
    return (
        max(0, int(round(x0 - d[0] * sx))),
        max(0, int(round(y0 - d[1] * sy))),
        min(w - 1, int(round(x1 + d[2] * sx))),
        min(h - 1, int(round(y1 + d[3] * sy))),
    )


# ---------------------------------------------------------------------------------------------
# the official LiteMedSAM 3D inference, as the yardstick


def _to_256_frame(mask: np.ndarray) -> np.ndarray:
    """A slice mask as the official code sees it: longest side to 256 (INTER_AREA), zero padded."""
    import cv2

    h, w = mask.shape
    s = 256.0 / max(h, w)
    nh, nw = int(h * s + 0.5), int(w * s + 0.5)
    small = cv2.resize(mask.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_AREA)
    out = np.zeros((256, 256), dtype=np.uint8)
    out[:nh, :nw] = small
    return out


def official_baseline(predictor, box2d, first: int, last: int) -> Dict[int, np.ndarray]:
    """`MedSAM_infer_npz_3D` on one 3D box. Boxes are made at 256 scale as the official code makes
    them and handed to the predictor in slice pixels that truncate back to the same 256-scale
    integers (+0.25 px at 256 scale before dividing: int(v) of the predictor gives them back)."""
    h, w = predictor.slice_shape
    s = 256.0 / max(h, w)
    middle = int((last - first) / 2 + first)
    masks: Dict[int, np.ndarray] = {}

    def run(index: int, box_256) -> None:
        box = [(float(v) + 0.25) / s for v in box_256]
        prob, _ = predictor.probabilities(index, [box])
        masks[index] = prob[0] > 0.5

    def next_box(prev: np.ndarray):
        frame = _to_256_frame(prev)
        if frame.max() == 0:
            return [int(v * s) for v in box2d]
        ys, xs = np.nonzero(frame)
        shift = BASELINE_SHIFT_256
        return [max(0, xs.min() - shift), max(0, ys.min() - shift), min(256, xs.max() + shift), min(256, ys.max() + shift)]

    run(middle, [int(v * s) for v in box2d])
    for index in range(middle + 1, last + 1):
        run(index, next_box(masks[index - 1]))
    for index in range(middle - 1, first - 1, -1):
        run(index, next_box(masks[index + 1]))
    return masks


def stack(masks: Dict[int, np.ndarray], shape) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    for index, mask in masks.items():
        out[index] = mask
    return out


# ---------------------------------------------------------------------------------------------
# per structure


def structure_notes(name: str, truth: np.ndarray, others: Dict[str, np.ndarray]) -> Dict[str, object]:
    """Facts about a structure that decide how its numbers can be read (computed, not per name).

    pieces: on the median slice, the largest 2D piece holds under half the structure's pixels (the
        ribs: one box around a ring of ribs is no prompt for a box-prompted model).
    ends: per end, "edge" (the truth reaches the volume's edge), "abuts X" (labelled structure X
        takes over where the structure ends, and does not surround it: the vertebral columns split
        by level), or "free". X takes over if it covers at least half of the end slice's mask on
        the slice beyond, or already on the end slice covers half of the slice before's: a label
        boundary drawn inside a slice leaves a few-pixel end slice (the cervical column's last
        slice holds 5 px; the thoracic column's label covers 103 of the 155 px before it).
    """
    mid = median_slice(truth)
    labels, count = ndimage.label(truth[mid], structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel())[1:]
    pieces = bool(count > 1 and sizes.max() < 0.5 * truth[mid].sum())
    first, last = extent(truth)
    n = truth.shape[0]
    ends = {}
    for end, index, beyond, inner in (("low", first, first - 1, first + 1), ("high", last, last + 1, last - 1)):
        if not 0 <= beyond < n:
            ends[end] = "edge"
            continue
        ends[end] = "free"
        # (slice of the structure, slice of X): the end and beyond, or the one before the end and the end
        pairs = [(index, beyond)] + ([(inner, index)] if first <= inner <= last else [])
        for other_name, other in others.items():
            if other_name == name or not any((other[b] & truth[a]).sum() >= 0.5 * truth[a].sum() for a, b in pairs):
                continue
            if not surrounds(other, truth):
                ends[end] = f"abuts {other_name}"
                break
    return {"pieces": pieces, "pieces_on_median_slice": int(count), "ends": ends}


def surrounds(other: np.ndarray, truth: np.ndarray) -> bool:
    """Does `other`'s 3D bounding box hold `truth`'s (the body outline around an organ)?"""
    (ox0, oy0, ox1, oy1), (ofirst, olast) = box3d(other)
    (bx0, by0, bx1, by1), (first, last) = box3d(truth)
    return ox0 <= bx0 and oy0 <= by0 and ox1 >= bx1 and oy1 >= by1 and ofirst <= first and olast >= last


def neighbours(name: str, truths: Dict[str, np.ndarray]) -> Optional[np.ndarray]:
    """The other labels that do not surround the structure, as one mask: what the Slicer effect's
    editable area "outside all segments" protects once they are contoured (None: there are none)."""
    others = [t for n, t in truths.items() if n != name and t.any() and not surrounds(t, truths[name])]
    return np.logical_or.reduce(others) if others else None


def ends_vs_truth(pred: np.ndarray, truth: np.ndarray) -> Tuple[Optional[int], Optional[int]]:
    """(low, high): slices past the truth's end (+) or short of it (-); None for an empty result."""
    ep, et = extent(pred), extent(truth)
    if ep is None:
        return None, None
    return et[0] - ep[0], ep[1] - et[1]


def evaluate(predictor, name: str, truth: np.ndarray, spacing_kji, model: str, key_every: int, rng_seed: int = 0,
             protected: Optional[np.ndarray] = None) -> dict:
    shape = truth.shape
    row: Dict[str, object] = {"structure": name, "slices": int(truth.any(axis=(1, 2)).sum())}
    present = [k for k in range(shape[0]) if truth[k].any()]
    mid = median_slice(truth)
    scale = box_scale(model, predictor.slice_shape)
    rng = np.random.default_rng(rng_seed)

    d_mid, s_mid = None, None
    tight, jit = [], []
    for k in present:
        box = mask_bbox(truth[k])
        mask, score = predictor(k, box)
        tight.append(dice(mask, truth[k]))
        if k == mid:
            d_mid, s_mid = tight[-1], score
        mask_j, _ = predictor(k, jittered_box(box, predictor.slice_shape, scale, rng))
        jit.append(dice(mask_j, truth[k]))
    row.update(seed_slice=mid, dice2d_median=d_mid, score_median=s_mid, dice2d_mean=float(np.mean(tight)),
               dice2d_jitter=float(np.mean(jit)))

    def record(mode: str, pred: np.ndarray, result=None) -> None:
        row[f"dice_{mode}"] = dice(pred, truth)
        row[f"nsd_{mode}"] = nsd(pred, truth, spacing_kji)
        low, high = ends_vs_truth(pred, truth)
        row[f"ends_{mode}"] = [low, high]
        if result is not None:
            row[f"reasons_{mode}"] = dict(result.stop_reasons)

    t0 = time.time()
    result = propagate_from_slice(predictor, mid, seed_box=mask_bbox(truth[mid]))
    record("a", result.volume("k", shape), result)
    row["seconds_a"] = time.time() - t0
    if protected is not None:  # mode a with the other labels contoured and protected (PROTECTED_EVIDENCE)
        result = stop_at_protected(result, mid, lambda k: protected[k])
        record("a_protected", result.volume("k", shape), result)
    box2d, (first, last) = box3d(truth)
    result = segment_box3d(predictor, box2d, first, last)
    record("b", result.volume("k", shape), result)
    keys = sorted(set(list(range(first, last + 1, key_every)) + [last]))
    keys = [k for k in keys if truth[k].any()]
    result = segment_key_slices(predictor, {k: mask_bbox(truth[k]) for k in keys})
    record("c", result.volume("k", shape), result)
    row["key_slices"] = keys
    record("base", stack(official_baseline(predictor, box2d, first, last), shape))
    return row


# ---------------------------------------------------------------------------------------------
# windows


def window_sweep(engine, volume, truths: Dict[str, np.ndarray], cache, windows=SWEEP_WINDOWS, per_structure: int = 9) -> dict:
    """Mean tight-box 2D Dice per window and structure (on up to `per_structure` slices), and the
    window the model's own score prefers on the median slice (argmax of the predicted IoU there)."""
    out = {}
    predictors = {w: SlicePredictor(engine, volume.array, from_width_level(*windows[w], name=w), "k", cache) for w in windows}
    for name, truth in truths.items():
        present = [k for k in range(truth.shape[0]) if truth[k].any()]
        mid = median_slice(truth)
        # at most `per_structure` slices, evenly spread, the median one included
        present = sorted(set(present[int(round(t))] for t in np.linspace(0, len(present) - 1, per_structure)) | {mid})
        per = {"pairs": {}}  # slice -> [(window, score, Dice)]: does the score rank the windows?
        for wname, predictor in predictors.items():
            ds = []
            for k in present:
                mask, score = predictor(k, mask_bbox(truth[k]))
                ds.append(dice(mask, truth[k]))
                per["pairs"].setdefault(str(k), []).append((wname, None if score is None else float(score), ds[-1]))
                if k == mid:
                    per.setdefault("score_mid", {})[wname] = score
                    per.setdefault("dice_mid", {})[wname] = ds[-1]
            per.setdefault("dice_mean", {})[wname] = float(np.mean(ds))
        per["picked_by_score"] = max(per["score_mid"], key=per["score_mid"].get)
        per["best_mean"] = max(per["dice_mean"], key=per["dice_mean"].get)
        out[name] = per
    return out


def score_ranking(sweep: dict, tie: float = 0.01, skip=()) -> Optional[str]:
    """How well the model's quality score ranks the windows of one slice, over the sweep's slices:
    how often its top-scored window has the best Dice (within `tie`), and the Spearman correlation
    of score and Dice over each slice's windows (median over slices). The evidence a model family
    needs before SCORE_RANKS_QUALITY is set (window_choice.py); None when the model gives no score.
    Structures in `skip` (made of pieces: no box prompt for them) are left out."""
    from scipy.stats import spearmanr

    hits, total, rhos = 0, 0, []
    for name, per in sweep.items():
        if name in skip:
            continue
        for pairs in per["pairs"].values():
            if any(score is None for _, score, _ in pairs):
                return None
            scores = np.array([score for _, score, _ in pairs])
            dices = np.array([d for _, _, d in pairs])
            total += 1
            hits += int(dices[int(np.argmax(scores))] >= dices.max() - tie)
            if np.ptp(scores) > 0 and np.ptp(dices) > 0:
                rhos.append(spearmanr(scores, dices)[0])
    if not total:
        return None
    line = f"score ranks windows: its top window has the best 2D Dice (within {tie}) on {hits} of {total} slices"
    if not rhos:  # every slice's scores or Dice were all equal
        return line
    return (f"{line}; Spearman of score and Dice per slice: median {np.median(rhos):.2f} (quartiles "
            f"{np.percentile(rhos, 25):.2f}-{np.percentile(rhos, 75):.2f}, {len(rhos)} slices)")


def print_window_sweep(sweep: dict, picks: Optional[Dict[str, str]] = None, skip=()) -> None:
    """The sweep's table; * marks the window the product picked for the structure (`picks`:
    structure -> "W/L", as window_choice names its candidates), else the median slice's best score."""
    names = list(next(iter(sweep.values()))["dice_mean"])
    by_value = {tuple(float(v) for v in SWEEP_WINDOWS[w]): w for w in names}
    print("\n### 2D Dice (mean over up to 9 slices per structure, tight boxes) per window; * = the window the product "
          "picked (else the one the model's score prefers on the median slice)\n")
    print("| structure | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for name, per in sweep.items():
        picked = (picks or {}).get(name)  # the product names CT picks "W/L" (presets by their own names)
        if picked is not None and "/" in picked:
            picked = by_value.get(tuple(float(v) for v in picked.split("/")), picked)
        marked = picked if picked in names else per["picked_by_score"]
        cells = [f"{per['dice_mean'][w]:.3f}{'*' if w == marked else ''}" for w in names]
        print(f"| {name} | " + " | ".join(cells) + " |")
    ranking = score_ranking(sweep, skip=skip)
    if ranking is not None:
        print(f"\n{ranking}")


# ---------------------------------------------------------------------------------------------
# table


def fmt_end(value, note) -> str:
    if note == "edge":
        return "edge"
    text = "-" if value is None else f"{value:+d}"
    return text + (" (abuts)" if str(note).startswith("abuts") else "")


def print_table(rows: List[dict]) -> None:
    print("| structure | slices | 2D med | 2D mean | 2D jit | a Dice | a NSD | a ends (low, high) | b Dice | b NSD "
          "| c Dice | c NSD | base Dice | base NSD | a stop reasons (down / up) |")
    print("|---|" + "---|" * 14)
    for r in rows:
        name = r["structure"] + (" (pieces)" if r["notes"]["pieces"] else "")
        ends = r["notes"]["ends"]
        low, high = r["ends_a"]
        reasons = r.get("reasons_a", {})
        print(
            f"| {name} | {r['slices']} | {r['dice2d_median']:.3f} | {r['dice2d_mean']:.3f} | {r['dice2d_jitter']:.3f} "
            f"| {r['dice_a']:.3f} | {r['nsd_a']:.3f} | {fmt_end(low, ends['low'])}, {fmt_end(high, ends['high'])} "
            f"| {r['dice_b']:.3f} | {r['nsd_b']:.3f} | {r['dice_c']:.3f} | {r['nsd_c']:.3f} "
            f"| {r['dice_base']:.3f} | {r['nsd_base']:.3f} | {reasons.get('down', '')} / {reasons.get('up', '')} |"
        )


def summarise(rows: List[dict]) -> List[str]:
    """The issue's goals, over structures that are one piece (free ends only for the end goal; the
    organs' 2D Dice is the tight box's on the median slice, the issue's own measure)."""
    whole = [r for r in rows if not r["notes"]["pieces"]]
    organs = [r for r in whole if r.get("dataset") != "tumours"]
    tumours = [r for r in whole if r.get("dataset") == "tumours"]
    lines = []
    ends = []
    for r in organs:
        for value, end in zip(r["ends_a"], ("low", "high")):
            if r["notes"]["ends"][end] == "free" and r["dice2d_median"] >= 0.85:
                ends.append(value)
    within = sum(1 for e in ends if e is not None and abs(e) <= 1)
    past = max([e for e in ends if e is not None] + [0])
    lines.append(f"mode a, free ends of organs with median-slice 2D Dice >= 0.85: {within}/{len(ends)} within +-1 slice, "
                 f"worst overshoot {past} slices")
    if tumours:
        ends = [v for r in tumours for v, end in zip(r["ends_a"], ("low", "high")) if r["notes"]["ends"][end] == "free"]
        within = sum(1 for e in ends if e is not None and abs(e) <= 2)
        past = max([e for e in ends if e is not None] + [0])
        lines.append(f"mode a, tumour ends: {within}/{len(ends)} within +-2 slices, worst overshoot {past} slices")
    if whole:
        a, b, c, base = (float(np.mean([r[f"dice_{m}"] for r in whole])) for m in ("a", "b", "c", "base"))
        lines.append(f"mean 3D Dice over {len(whole)} one-piece structures: a {a:.3f}, b {b:.3f}, c {c:.3f}, baseline {base:.3f}")
        worse = [r["structure"] for r in whole if r["dice_b"] < r["dice_base"] - 0.005]
        lines.append("mode b below the official baseline on: " + (", ".join(worse) if worse else "none"))
        guarded = [r for r in whole if "dice_a_protected" in r]
        if guarded:
            changed = [f"{r['structure']} {r['dice_a']:.3f} -> {r['dice_a_protected']:.3f} "
                       f"(ends {fmt_end(r['ends_a'][0], '')}, {fmt_end(r['ends_a'][1], '')} -> "
                       f"{fmt_end(r['ends_a_protected'][0], '')}, {fmt_end(r['ends_a_protected'][1], '')})"
                       for r in guarded if r["ends_a_protected"] != r["ends_a"]]
            before, after = (float(np.mean([r[k] for r in guarded])) for k in ("dice_a", "dice_a_protected"))
            lines.append(f"mode a with the other labels protected, over {len(guarded)}: {before:.3f} -> {after:.3f}; "
                         "changed: " + ("; ".join(changed) if changed else "none"))
    return lines


def parse_window(text: str, volume: np.ndarray):
    text = (text or "auto").strip()
    if "," in text or "/" in text:
        width, level = (float(v) for v in text.replace("/", ",").split(","))
        return choose_window(volume, window=(width, level))
    return choose_window(volume, preset=text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="litemedsam", choices=("litemedsam", "medsam"))
    parser.add_argument("--checkpoint", help="weights file (default: the model's own weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--data", choices=DATASETS + ("all",),
                        help="ctchest (slicerio's CT sample, the default), tumours (pyradiomics' 5 cases), brain (Colin27 "
                             "and AAL), abdomen (TotalSegmentator's test CT and MR); all but ctchest are downloaded once; or all")
    parser.add_argument("--volume", action="append", default=[], help="your own volume (NRRD, NIfTI, MHA, DICOM folder) "
                        "instead of --data; repeat with --labels for more cases")
    parser.add_argument("--labels", action="append", default=[], help="its labels: a .seg.nrrd or an integer label map")
    parser.add_argument("--label-names", default="", help="names of a label map's values, e.g. 1=liver,2=spleen "
                        "(default: 'label N')")
    parser.add_argument("--tumours", default="", help="comma-separated structures of --volume to count as tumours "
                        "(their ends are judged within +-2 slices)")
    parser.add_argument("--structures", help="comma-separated names (default: every segment)")
    parser.add_argument("--window", default="model",
                        help="model (picked per structure by the model's score, as segment does: the default), auto "
                             "(choose_window: one window per volume), a preset name, or W,L")
    parser.add_argument("--key-every", type=int, default=5, help="mode c: a key slice every N slices (default 5)")
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "medsam-slicer", "accuracy-eval"))
    parser.add_argument("--window-sweep", action="store_true", help="also 2D Dice per window preset (CT only), and how well the model's score ranks the windows")
    parser.add_argument("--json", help="write every number to this file")
    args = parser.parse_args(argv)
    t0 = time.time()
    wanted = [s.strip() for s in (args.structures or "").split(",") if s.strip()]
    if len(args.volume) != len(args.labels):
        parser.error(f"give --labels once per --volume ({len(args.volume)} volumes, {len(args.labels)} label files)")
    if args.volume and args.data:
        parser.error("--data and --volume cannot be combined: evaluate one or the other")
    try:
        names = parse_label_names(args.label_names)
        sources = [files_case(image, labels, names) for image, labels in zip(args.volume, args.labels)]
    except (InputError, ValueError) as error:
        parser.error(str(error))
    tumours = {s.strip() for s in args.tumours.split(",") if s.strip()}
    known = {name for _, _, truths in sources for name in truths}
    if tumours - known:
        parser.error(f"--tumours names no structure of the given labels: {', '.join(sorted(tumours - known))}")
    if sources:
        sources = [("files", c) for c in sources]
    else:  # the built-in data sets, read one case at a time (the downloads happen here)
        sources = ((dataset, c) for dataset in (DATASETS if args.data == "all" else (args.data or "ctchest",))
                   for c in cases(dataset, args.cache_dir))

    engine = load_engine(args.model, args.checkpoint, args.device, args.precision)
    cache = EmbeddingCache(2 << 30, disk_dir=args.cache_dir)
    by_model = args.window == "model"  # the product's automatic CT window, picked per structure (window_choice)
    rows, sweeps, found, encoded = [], {}, set(), 0
    for dataset, (case, volume, truths) in sources:
        chosen = {s: t for s, t in truths.items() if t.any() and (not wanted or s in wanted)}
        found.update(chosen)
        if not chosen:
            continue
        spacing_kji = tuple(float(v) for v in np.asarray(volume.spacing)[::-1])
        window = parse_window("auto" if by_model else args.window, volume.array)
        predictor = SlicePredictor(engine, volume.array, window, "k", cache, slice_mm=spacing_kji[0])
        print(f"{case}: model {args.model}, window {window.name} [{window.low:g}, {window.high:g}], "
              f"{volume.shape_kji} spacing {spacing_kji} mm (k, j, i)", file=sys.stderr)
        for name, truth in chosen.items():
            if by_model and model_picks_window(engine, volume.array):
                from medsam_slicer.session import LocalSession

                mid = median_slice(truth)
                session = LocalSession(engine, volume.array, window, cache=cache, spacing=volume.spacing)
                picked, _ = pick_window(session, "k", mid, mask_bbox(truth[mid]))
                predictor = SlicePredictor(engine, volume.array, picked, "k", cache, slice_mm=spacing_kji[0])
                print(f"  {name}: window {picked.name} picked by the model on slice {mid}", file=sys.stderr)
            row = evaluate(predictor, name, truth, spacing_kji, args.model, args.key_every,
                           protected=neighbours(name, truths))
            row["case"] = case
            row["dataset"] = "tumours" if dataset == "files" and name in tumours else dataset
            row["window"] = predictor.window.name
            row["notes"] = structure_notes(name, truth, truths)
            rows.append(row)
            encoded += predictor.encoded
            print(f"  {name}: 2D {row['dice2d_mean']:.3f}, a {row['dice_a']:.3f}, b {row['dice_b']:.3f}, "
                  f"c {row['dice_c']:.3f}, base {row['dice_base']:.3f} ({time.time() - t0:.0f} s)", file=sys.stderr)
        if args.window_sweep and looks_like_hounsfield(volume.array):
            sweeps.update(window_sweep(engine, volume, chosen, cache))
    missing = [s for s in wanted if s not in found]
    if missing:
        parser.error(f"unknown structure(s) {', '.join(missing)}")
    print()
    print_table(rows)
    print()
    lines = summarise(rows)
    for line in lines:
        print(line)
    out = {"model": args.model, "window": args.window, "rows": rows, "summary": lines}
    if sweeps:
        out["window_sweep"] = sweeps
        print_window_sweep(sweeps, {r["structure"]: r["window"] for r in rows if r["window"] != "mr"},
                           skip={r["structure"] for r in rows if r["notes"]["pieces"]})
    print(f"\n{time.time() - t0:.0f} s, {encoded} slices encoded (the rest from the cache)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=lambda v: v.item() if hasattr(v, "item") else str(v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
