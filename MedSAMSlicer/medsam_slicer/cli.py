"""The `medsam-slicer` command line: segment, batch, demo, weights, bench, serve.

User mistakes print one line (`medsam-slicer: error: ...`) and exit with code 2; arguments and
files are checked before the model is loaded, and no output file is left behind on failure.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .engine import PRECISIONS
from .errors import MedSAMError
from .model import DEVICES
from .models import DEFAULT_MODEL, MODEL_NAMES
from .windowing import PRESET_NAMES

EXIT_USAGE = 2
BACKEND_CHOICES = ["auto", "torch", "onnx", "openvino"]
BACKEND_HELP = ("image encoder engine on the CPU: auto (recommended: the fastest that passes the accuracy guard, "
                "measured once per CPU, library versions and weights), torch (default), onnx or openvino "
                "(medsam-slicer[cpu]; exported and checked against torch at first use)")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise MedSAMError(f"{message} (see {self.prog} --help)")


MODEL_HELP = (f"{' or '.join(MODEL_NAMES)} (default: {DEFAULT_MODEL}, or the model whose weights --checkpoint holds); "
              "medsam is the paper's ViT-B, litemedsam the official plugin's 10x cheaper TinyViT")


def _add_model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=MODEL_NAMES, help=MODEL_HELP)


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    _add_model_option(p)
    p.add_argument("--checkpoint", metavar="FILE", help="weights file (.pth, .bin or .safetensors); default: the model's own")
    p.add_argument("--device", default="auto", choices=DEVICES, help="default: auto (CUDA, MPS, CPU)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="default: auto (bf16 on CUDA and bf16-capable CPUs, fp16 on MPS, else fp32); int8 (opt-in) "
                        "runs on the onnx/openvino backend, refused if it fails its accuracy guard")
    p.add_argument("--backend", default=None, choices=BACKEND_CHOICES, help=BACKEND_HELP)
    p.add_argument("--disk-cache", metavar="DIR", help="keep image embeddings in DIR across runs (or set MEDSAM_SLICER_DISK_CACHE)")
    p.add_argument("--server", metavar="URL", help="run on a remote medsam-slicer server instead of locally")
    p.add_argument("--token", help="bearer token for --server")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="medsam-slicer", description="MedSAM and LiteMedSAM (box prompts) on medical volumes.")
    parser.add_argument("--version", action="version", version=f"medsam-slicer {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    seg = sub.add_parser("segment", help="segment boxes in a volume", description=(
        "Boxes are inclusive voxel indices I0 J0 K0 I1 J1 K1 (i = column, j = row, k = slice, as SimpleITK "
        "indexes the file). A box flat along the axis segments that slice (or grows from it with --propagate); "
        "a box spanning slices segments its range (3D box); --key-box boxes on several slices are interpolated."))
    seg.add_argument("input", help="NRRD, NIfTI, MetaImage, a DICOM series folder, or a PNG/JPEG/TIFF image")
    seg.add_argument("-o", "--output", required=True, help=".seg.nrrd (Slicer segmentation) or a label map (.nii.gz, .nrrd, ...)")
    seg.add_argument("--box", nargs=6, type=float, action="append", default=[], metavar=("I0", "J0", "K0", "I1", "J1", "K1"))
    seg.add_argument("--key-box", nargs=6, type=float, action="append", default=[], metavar=("I0", "J0", "K", "I1", "J1", "K"),
                     help="a box on one key slice; repeat for several key slices of ONE structure")
    seg.add_argument("--name", action="append", default=[], help="segment name, one per --box (then the key-box segment)")
    seg.add_argument("--axis", default="k", help="slicing axis: i, j or k (default k)")
    win = seg.add_mutually_exclusive_group()
    win.add_argument("--window", nargs=2, type=float, metavar=("W", "L"), help="intensity window width and level")
    win.add_argument("--preset", choices=PRESET_NAMES, help="intensity preset (default auto: on CT, LiteMedSAM picks a window per segment from "
                     "its seed slice; ct-abdomen with ViT-B; mr for other data)")
    seg.add_argument("--propagate", action="store_true", help="grow from a flat box's slice across slices")
    seg.add_argument("--direction", default="both", choices=["both", "up", "down"], help="with --propagate")
    seg.add_argument("--max-slices", type=int, help="with --propagate: most slices per direction")
    seg.add_argument("--min-area", type=int, help="stop rule: a mask smaller than this (pixels) ends growth")
    seg.add_argument("--max-area-ratio", type=float, help="stop rule: area jumping/collapsing by more than this factor")
    seg.add_argument("--min-score", type=float, help="stop rule: model quality score below this ends growth")
    seg.add_argument("--no-centroid-check", action="store_true", help="stop rule off: mask centroid leaving the previous box")
    seg.add_argument("--min-appearance", type=float, metavar="F",
                     help="stop rule: share of the new mask's pixels inside the seed's intensity range below F "
                          "ends growth (default 0.5; 0 switches it off)")
    seg.add_argument("--min-score-ratio", type=float, metavar="F",
                     help="stop rule: the model's score on a new slice below F times the seed slice's ends growth "
                          "(default 0.7, LiteMedSAM only; 0 switches it off)")
    seg.add_argument("--min-stability-ratio", type=float, metavar="F",
                     help="stop rule: where a slice's mask and the mask of a slightly looser box agree (IoU) less "
                          "than F times as well as on the seed slice, on two slices in a row, growth ends "
                          "(default 0.8; 0 switches it off)")
    seg.add_argument("--min-backward-ratio", type=float, metavar="F",
                     help="stop rule: the slice grown from is prompted again with the new mask's box; where that mask "
                          "agrees (IoU) with its own less than F times as well as on the first grown slice, on two "
                          "slices in a row, growth ends (default 0.8; 0 switches it off)")
    seg.add_argument("--min-footprint-share", type=float, metavar="F",
                     help="where the model's mask moves onto other tissue at a structure's end (under 30%% like the "
                          "seed; a lung's base around the liver's dome), growth goes on inside the previous mask, "
                          "without the model, while each slice keeps at least F of the previous one's area "
                          "(default 0.15; 0 switches it off)")
    seg.add_argument("--protect", metavar="FILE",
                     help="with --propagate: growth ends where it runs into the segments of FILE (a .seg.nrrd or "
                          "label map of this volume, e.g. the neighbours contoured before), as the Slicer effect "
                          "ends at segments the editable area protects")
    seg.add_argument("--no-largest-component", action="store_true", help="keep every 3D component, not only the largest")
    seg.add_argument("--fill-holes", action="store_true", help="fill holes slice by slice")
    seg.add_argument("--probabilities", metavar="FILE", help="also write the foreground probability (float32)")
    seg.add_argument("--force", action="store_true", help="overwrite existing output files")
    seg.add_argument("--quiet", action="store_true", help="no progress bar")
    seg.add_argument("--format", default="auto", choices=["auto", "dicom-seg", "rtstruct"],
                     help="for a .dcm output: DICOM SEG (default) or RT Structure Set; needs a DICOM series input")
    _add_engine_options(seg)

    batch = sub.add_parser("batch", help="segment many volumes from a JSON Lines manifest", description=(
        "One case per line: {\"input\": ..., \"output\": ..., \"window\": [W, L] or \"preset\": ..., "
        "\"segments\": [{\"name\": ..., \"box\": [I0, J0, K0, I1, J1, K1], \"propagate\": true} or "
        "{\"name\": ..., \"key_boxes\": [[...], ...]}]}, paths relative to the manifest. Boxes as in segment."))
    batch.add_argument("manifest", help="JSON Lines file, one case per line")
    _add_model_option(batch)
    batch.add_argument("--checkpoint", metavar="FILE", help="weights file; default: the model's own")
    batch.add_argument("--device", default="auto", choices=DEVICES)
    batch.add_argument("--precision", default="auto", choices=PRECISIONS)
    batch.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="run on Ray: a cluster's address, or none to use RAY_ADDRESS or start a local Ray")
    batch.add_argument("--workers", type=int, help="processes here, or Ray actors (default: 1; with Ray, one per GPU)")
    batch.add_argument("--report", metavar="FILE", help="write a CSV report, one row per case")
    batch.add_argument("--force", action="store_true", help="redo cases whose output exists")
    batch.add_argument("--quiet", action="store_true", help="no progress bar")

    demo = sub.add_parser("demo", help="segment the right lung of slicerio's CT chest sample and report Dice")
    demo.add_argument("-o", "--output-dir", default="demo-output")
    demo.add_argument("--force", action="store_true")
    demo.add_argument("--quiet", action="store_true")
    _add_engine_options(demo)

    weights = sub.add_parser("weights", help="download, locate or verify a model's weights")
    wsub = weights.add_subparsers(dest="weights_command", parser_class=_Parser)
    for name, text in (("download", "download into the per-user cache (resumes; checks SHA-256)"),
                       ("path", "print where the weights are (or will be)")):
        _add_model_option(wsub.add_parser(name, help=text))
    wver = wsub.add_parser("verify", help="check a weights file against its pinned or recorded SHA-256")
    _add_model_option(wver)
    wver.add_argument("file", nargs="?", help="default: the model's weights")

    bench = sub.add_parser("bench", help="time the encoder, decoder, re-prompts and propagation on this machine")
    _add_model_option(bench)
    bench.add_argument("--checkpoint", metavar="FILE", help="default: random weights of the model (speed does not depend on values)")
    bench.add_argument("--device", default="auto", choices=DEVICES)
    bench.add_argument("--precisions", nargs="+", default=None, help="e.g. fp32 bf16 (default: per device)")
    bench.add_argument("--slices", type=int, default=8, help="slices propagated (default 8)")
    bench.add_argument("--no-reference", action="store_true", help="skip the published fp32 reference configuration")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.add_argument("--isa-cap", choices=["avx2"], help="also time the rows again in a subprocess capped to this "
                       "instruction set (oneDNN, ATen, MKL; emulates an AVX2-only CPU)")

    serve = sub.add_parser("serve", help="run a resident MedSAM server for Slicer users")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--model", choices=MODEL_NAMES, action="append",
                       help=f"model(s) to hold, repeat for several; requests name theirs (default: {DEFAULT_MODEL})")
    serve.add_argument("--checkpoint", metavar="FILE", action="append",
                       help="weights instead of the model's own: one per --model, in the same order")

    serve.add_argument("--device", default="auto", choices=DEVICES)
    serve.add_argument("--precision", default="auto", choices=PRECISIONS)
    serve.add_argument("--backend", default=None, choices=BACKEND_CHOICES, help=BACKEND_HELP)
    tok = serve.add_mutually_exclusive_group()
    tok.add_argument("--token", help="bearer token clients must send (required off loopback); visible to local users "
                                     "in ps: prefer --token-file or $MEDSAM_SLICER_TOKEN")
    tok.add_argument("--token-file", metavar="FILE", help="one token per line (one per user)")
    serve.add_argument("--max-sessions", type=int, default=16, help="open sessions at most (default 16)")
    serve.add_argument("--idle-timeout", type=float, default=1800, help="seconds before an idle session closes")
    serve.add_argument("--cache-mb", type=int, help="embedding cache budget shared by all sessions")
    serve.add_argument("--max-request-mb", type=int, default=1024, help="larger requests get 413")
    serve.add_argument("--memory-gb", type=float,
                       help="one budget for volumes, masks and embeddings (default: half this machine's RAM)")
    serve.add_argument("--limit-concurrency", type=int, help="connections at once, more get 503 (default 64)")
    serve.add_argument("--timeout-keep-alive", type=int, help="seconds an idle connection stays open (default 5)")
    serve.add_argument("--header-timeout", type=float, help="seconds a client has to send its headers (default 10)")
    serve.add_argument("--max-header-bytes", type=int, help="larger request heads are refused (default 16384)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return EXIT_USAGE
        if args.command == "segment":
            from .segment_command import run_segment

            return run_segment(args)
        if args.command == "batch":
            from .batch import run_batch

            return run_batch(args)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args)
        if args.command == "weights":
            return _weights(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "serve":
            from .server.serve import serve

            serve(host=args.host, port=args.port, models=args.model, checkpoint=args.checkpoint, device=args.device,
                  precision=args.precision, backend=args.backend, token=args.token, token_file=args.token_file,
                  max_sessions=args.max_sessions, idle_timeout_s=args.idle_timeout, cache_mb=args.cache_mb,
                  max_request_mb=args.max_request_mb, memory_gb=args.memory_gb,
                  limit_concurrency=args.limit_concurrency, timeout_keep_alive=args.timeout_keep_alive,
                  header_timeout=args.header_timeout, max_header_bytes=args.max_header_bytes)
            return 0
    except MedSAMError as exc:
        print(f"medsam-slicer: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("medsam-slicer: interrupted", file=sys.stderr)
        return 130
    return EXIT_USAGE


def _weights(args) -> int:
    from . import weights
    from .models import get_family

    if args.weights_command is None:
        raise MedSAMError("weights needs a subcommand: download, path or verify")
    family = get_family(args.model)
    if args.weights_command == "path":
        print(family.ensure_weights(None, download=False))
    elif args.weights_command == "download":
        print(family.ensure_weights(None, progress=True))
    elif args.weights_command == "verify":
        pinned = None if args.file else getattr(family, "SHA256", None)  # a family's own file may have a pin
        path = args.file or family.ensure_weights(None, download=False)
        known = pinned or weights.pinned_sha256(path) or weights.recorded_sha256(path)
        digest = weights.verify(path, pinned)
        if known:
            print(f"{path}: OK sha256 {digest}")
        else:  # nothing to check against yet: say so rather than "OK"
            print(f"{path}: no digest was known; recorded sha256 {digest} in {weights.digest_sidecar(path)} "
                  "(later checks compare against it)")
    return 0


def _bench(args) -> int:
    from .bench import format_table, run_benchmark

    results = run_benchmark(model=args.model, checkpoint=args.checkpoint, device=args.device, precisions=args.precisions,
                            slices=args.slices, reference=not args.no_reference, json_path=args.json,
                            isa_cap=args.isa_cap)
    print(format_table(results))
    return 0


def run() -> None:
    """The `medsam-slicer` command: main(), then exit without the interpreter's teardown. Every
    output is written and closed by then; unloading torch's and OpenVINO's modules one by one
    took ~0.6 s of a 4-6 s `segment` run (AMD EPYC Zen 4)."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
