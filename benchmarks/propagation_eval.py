"""Evaluates 3D propagation with oracle predictors on slicerio's CT chest sample and synthetic shapes.

    python benchmarks/propagation_eval.py [--json out.json] [--quick]

An oracle answers a box prompt with the true mask cut to the box (a perfect box-prompted model);
degraded oracles add model-like errors (Testing/oracles.py). This measures the propagation logic
(prompt boxes, stop rules, post-processing), not MedSAM's accuracy. Per structure, mode and oracle:
Dice against the expert mask, slices missed (+) or overshot (-) at the low and high end, stop
reasons. Then sweeps of the defaults (margin, area ratio, minimum area, key-slice box combination).

Modes: a = grow from the structure's middle slice (seed box = the expert mask's box there);
b = the structure's 3D bounding box; c = key-slice boxes every 5 slices plus the last slice;
d = mode a with the "dropped" oracle (stops early at a dropped slice), then the user corrects the
first missing slice beyond each early stop and re-propagates.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "Testing"))
sys.path.insert(0, os.path.join(HERE, "..", "MedSAMSlicer"))

from oracles import DEGRADATIONS, degraded_oracle, expert_segments, sample_paths, synthetic_shapes  # noqa: E402

from medsam_slicer.propagation import (  # noqa: E402
    default_margin,
    propagate_from_slice,
    repropagate,
    segment_box3d,
    segment_key_slices,
)
from medsam_slicer.slicing import mask_bbox  # noqa: E402
from medsam_slicer.stop_rules import StopRules  # noqa: E402

TARGET_DICE = ("right lung", "left lung", "cervical vertebral column", "thoracic vertebral column", "lumbar vertebral column")


def dice(a, b) -> float:
    return float(2.0 * (a & b).sum() / max(1, a.sum() + b.sum()))


def extent(truth):
    ks = np.flatnonzero(truth.any(axis=(1, 2)))
    return int(ks[0]), int(ks[-1])


def middle_slice(truth) -> int:
    first, last = extent(truth)
    mid = (first + last) // 2
    present = np.flatnonzero(truth.any(axis=(1, 2)))
    return int(present[np.argmin(np.abs(present - mid))])


def score_result(result, truth) -> dict:
    first, last = extent(truth)
    vol = result.volume("k", truth.shape)
    row = {"dice": round(dice(vol, truth), 4), "reasons": dict(result.stop_reasons)}
    if vol.any():
        lo, hi = extent(vol)
        row["low_end"] = lo - first  # + missed, - overshot
        row["high_end"] = last - hi
    else:
        row["low_end"] = row["high_end"] = None
    return row


def run_mode(mode, truth, oracle_kind, seed=0, rules=None, margin=None, combine="union", gap_fill="larger"):
    mid = middle_slice(truth)
    oracle = degraded_oracle(truth, oracle_kind, seed=seed, protect=[mid])
    if mode == "a":
        result = propagate_from_slice(oracle, mid, seed_box=mask_bbox(truth[mid]), rules=rules, margin=margin)
    elif mode == "b":
        first, last = extent(truth)
        result = segment_box3d(oracle, mask_bbox(truth.any(axis=0)), first, last, margin=margin)
    elif mode == "c":
        first, last = extent(truth)
        keys = sorted(set(list(range(first, last + 1, 5)) + [last]))
        keys = [k for k in keys if truth[k].any()]
        result = segment_key_slices(oracle, {k: mask_bbox(truth[k]) for k in keys}, margin=margin, combine=combine, gap_fill=gap_fill)
    elif mode == "d":
        result = propagate_from_slice(oracle, mid, seed_box=mask_bbox(truth[mid]), rules=rules, margin=margin)
        first, last = extent(truth)
        # the user corrects the first missing slice beyond each early stop, with the true mask
        for _ in range(8):
            lo, hi = min(result.masks), max(result.masks)
            if hi < last and hi >= mid:
                fix = hi + 1
            elif lo > first and lo <= mid:
                fix = lo - 1
            else:
                break
            result = repropagate(oracle, result, fix, truth[fix], seed_index=mid, rules=rules, margin=margin)
    else:
        raise ValueError(mode)
    repeats = len(oracle.requests) - len(set(oracle.requests))
    row = score_result(result, truth)
    row["calls"] = len(oracle.requests)
    row["repeated_calls"] = repeats
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write every number to this file")
    parser.add_argument("--quick", action="store_true", help="main table only, no sweeps")
    args = parser.parse_args(argv)
    t0 = time.time()

    structures = dict(expert_segments(sample_paths()[1]))
    names_ct = list(structures)
    structures.update(synthetic_shapes())
    out = {"rows": [], "sweeps": {}}

    # ---- main table
    print("Dice vs the expert/true mask; low/high: slices missed at that end (N), or overshot (Nover)")
    header = f"{'structure':28s} {'mode':4s} {'oracle':8s} {'dice':>6s} {'low':>5s} {'high':>5s}  stop reasons (up / down)"
    print(header)
    print("-" * len(header))
    for name, truth in structures.items():
        for mode in ("a", "b", "c", "d"):
            kinds = DEGRADATIONS if mode == "a" else (("exact", "dilated", "dropped") if mode != "d" else ("dropped",))
            for kind in kinds:
                row = run_mode(mode, truth, kind)
                row.update(structure=name, mode=mode, oracle=kind, ct=name in names_ct)
                out["rows"].append(row)
                reasons = row["reasons"]
                print(
                    f"{name:28s} {mode:4s} {kind:8s} {row['dice']:6.3f} {fmt_low(row['low_end']):>5s} "
                    f"{fmt_low(row['high_end']):>5s}  {reasons.get('up', '')} / {reasons.get('down', '')}"
                )

    # ---- targets
    summary = targets(out["rows"], names_ct)
    out["summary"] = summary
    print()
    for line in summary["lines"]:
        print(line)

    if not args.quick:
        out["sweeps"] = sweeps(structures, names_ct)
    print(f"\n{time.time() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


def fmt_low(v):
    if v is None:
        return "-"
    if v < 0:
        return f"{-v}over"
    return str(v)


def targets(rows, names_ct):
    lines = []
    exact_a = [r for r in rows if r["mode"] == "a" and r["oracle"] == "exact"]
    dice_ok = {r["structure"]: r["dice"] for r in exact_a if r["structure"] in TARGET_DICE}
    lines.append("target: exact oracle, mode a, Dice >= 0.95 on each lung and vertebral column: " + ", ".join(
        f"{k} {v:.3f}{'' if v >= 0.95 else ' (MISSED)'}" for k, v in dice_ok.items()))
    ends = [e for r in exact_a for e in (r["low_end"], r["high_end"]) if e is not None]
    within = sum(1 for e in ends if abs(e) <= 1)
    lines.append(f"target: exact oracle, mode a, stop within one slice of the true end: {within}/{len(ends)} ends "
                 f"({100.0 * within / max(1, len(ends)):.0f}%, target >= 90%)")
    degraded = [r for r in rows if r["mode"] == "a" and r["oracle"] != "exact"]
    over = [-e for r in degraded for e in (r["low_end"], r["high_end"]) if e is not None and e < 0]
    lines.append(f"target: degraded oracles, mode a, overshoot <= 2 slices: worst overshoot {max(over) if over else 0} "
                 f"slices over {len(degraded)} runs ({len(over)} ends overshoot at all)")
    repeats = sum(r["repeated_calls"] for r in rows)
    lines.append(f"repeated (slice, box) requests over all runs: {repeats}")
    by_mode = {}
    for r in rows:
        if r["oracle"] == "exact" or r["mode"] == "d":
            by_mode.setdefault((r["mode"], r["oracle"]), []).append(r["dice"])
    for (mode, kind), values in sorted(by_mode.items()):
        lines.append(f"mean Dice, mode {mode}, {kind} oracle, {len(values)} structures: {np.mean(values):.3f}")
    return {"lines": lines, "dice_targets": dice_ok, "ends_within_one": [within, len(ends)], "worst_overshoot": max(over) if over else 0}


def sweeps(structures, names_ct):
    res = {}
    lung_spine = [n for n in TARGET_DICE]
    shapes = {n: structures[n] for n in lung_spine}
    shapes.update({n: t for n, t in structures.items() if n not in names_ct})

    def summarise(kind, **kw):
        rows = [run_mode("a", t, kind, **kw) for t in shapes.values()]
        ends = [e for r in rows for e in (r["low_end"], r["high_end"]) if e is not None]
        return {
            "mean_dice": round(float(np.mean([r["dice"] for r in rows])), 4),
            "min_dice": round(float(np.min([r["dice"] for r in rows])), 4),
            "ends_within_one": f"{sum(abs(e) <= 1 for e in ends)}/{len(ends)}",
            "worst_overshoot": max([0] + [-e for e in ends if e < 0]),
        }

    print(f"\nsweeps, mode a, over {len(shapes)} structures (lungs, vertebral columns, synthetic shapes)")
    print("margin (slice px on the 128-px CT; 1024-scale equivalent)   oracle   mean/min Dice  ends within 1  worst overshoot")
    res["margin"] = {}
    for m in (0, 1, 2, 3):
        for kind in ("exact", "dilated"):
            s = summarise(kind, margin=m)
            res["margin"][f"{m}px/{kind}"] = s
            print(f"  {m} px ({m * 8} px at 1024)                                      {kind:8s} "
                  f"{s['mean_dice']:.3f}/{s['min_dice']:.3f}    {s['ends_within_one']:>6s}         {s['worst_overshoot']}")
    print(f"  default: {default_margin((128, 128))} px on 128 x 128, {default_margin((512, 512))} px on 512 x 512")

    print("max_area_ratio   oracle   mean/min Dice  ends within 1  worst overshoot")
    res["max_area_ratio"] = {}
    for ratio in (2.0, 3.0, 4.0, 5.0, 8.0, 1e9):
        for kind in ("exact", "eroded", "noisy"):
            s = summarise(kind, rules=StopRules(max_area_ratio=ratio))
            res["max_area_ratio"][f"{ratio}/{kind}"] = s
            label = "off" if ratio >= 1e9 else f"{ratio:g}"
            print(f"  {label:14s} {kind:8s} {s['mean_dice']:.3f}/{s['min_dice']:.3f}    {s['ends_within_one']:>6s}         {s['worst_overshoot']}")

    print("min_area   oracle   mean/min Dice  ends within 1  worst overshoot")
    res["min_area"] = {}
    for area in (1, 5, 20, 50):
        for kind in ("exact", "noisy"):
            s = summarise(kind, rules=StopRules(min_area=area))
            res["min_area"][f"{area}/{kind}"] = s
            print(f"  {area:<8d} {kind:8s} {s['mean_dice']:.3f}/{s['min_dice']:.3f}    {s['ends_within_one']:>6s}         {s['worst_overshoot']}")

    print("key-slice box combination (mode c)   oracle   mean/min Dice")
    res["combine"] = {}
    for combine, gap in [(c, "larger") for c in ("union", "intersect", "interpolate", "propagate")] + [("union", "both"), ("intersect", "both")]:
        for kind in ("exact", "dilated", "dropped"):
            rows = [run_mode("c", t, kind, combine=combine, gap_fill=gap) for t in shapes.values()]
            s = {"mean_dice": round(float(np.mean([r["dice"] for r in rows])), 4), "min_dice": round(float(np.min([r["dice"] for r in rows])), 4)}
            res["combine"][f"{combine}/{gap}/{kind}"] = s
            print(f"  {combine + ', gaps from ' + gap:34s} {kind:8s} {s['mean_dice']:.3f}/{s['min_dice']:.3f}")
    return res


if __name__ == "__main__":
    sys.exit(main())
