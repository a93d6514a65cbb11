"""Load benchmark of the medsam-slicer server: single-slice prompt latency under concurrent users,
and under a concurrent large request body.

For 1, 4 and 8 concurrent users (each with its own session and volume), every user sends a
sequence of single-slice prompts: a prompt on a slice not yet encoded ("cold": encoder + decoder)
followed by a second box on the same slice ("warm": decoder only). Each scenario runs twice: on an
otherwise idle server, and while one more user runs a long 3D job (a 3D box over every slice,
re-windowed each pass so it keeps the encoder busy). Prints p50 / p95 latency per scenario.

    python benchmarks/server_load.py --tiny                      # random tiny model, CPU (a smoke run)
    python benchmarks/server_load.py --checkpoint medsam_vit_b.pth --device cuda
    python benchmarks/server_load.py --url http://127.0.0.1:8765 --token ...   # a running server
    python benchmarks/server_load.py --tiny --large-body          # health + prompts during a 6.7 MB body

--large-body: one user prompts a slice over and over (warm: decoder only) and checks /v1/health
between prompts, for --seconds, first on an otherwise idle server, then while another client posts a
6.7 MB repropagate body (65,536 masks of 128x128) back to back; each such body is parsed, validated and
decoded in full, then refused for its margin (no model work), so what it costs the others is the
parsing alone. Prints p50 / p95 / max of both latencies.

Without --url a server is started on a free loopback port with the given checkpoint and device.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "MedSAMSlicer"))

from medsam_slicer.bench import cpu_model  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(args) -> "tuple[subprocess.Popen, str]":
    import requests

    port = _free_port()
    options = dict(host="127.0.0.1", port=port, checkpoint=args.checkpoint, device=args.device,
                   precision=args.precision, log_level="warning", max_batch=args.max_batch)
    code = ("import json, sys, torch\n"
            "n = int(sys.argv[2])\n"
            "torch.set_num_threads(n) if n > 0 else None\n"
            "from medsam_slicer.server.serve import serve\n"
            "serve(**json.loads(sys.argv[1]))\n")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "MedSAMSlicer"))
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(options), str(args.threads)], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if requests.get(f"{url}/v1/health", timeout=2).ok:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not start within 300 s")


def _load_volume(path: Optional[str]) -> np.ndarray:
    import SimpleITK as sitk

    if path is None:
        import slicerio

        path = os.path.join(os.path.dirname(slicerio.__file__), "data", "CTChest4.nrrd")
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def _percentile(values: List[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000.0 if values else float("nan")


class Background(threading.Thread):
    """One user running 3D boxes over the whole volume until stopped (re-windowed every pass)."""

    def __init__(self, engine, volume: np.ndarray):
        super().__init__(daemon=True)
        self.engine, self.volume = engine, volume
        self.stop = threading.Event()
        self.slices = 0
        self.error: Optional[str] = None

    def run(self) -> None:
        from medsam_slicer.windowing import from_width_level

        try:
            session = self.engine.open_session(self.volume, from_width_level(400, 40))
            h, w = self.volume.shape[1:]
            box = [w // 4, h // 4, 3 * w // 4, 3 * h // 4]
            passes = 0
            while not self.stop.is_set():
                passes += 1
                session.set_window(from_width_level(400 + passes, 40))
                result = session.segment_box3d("k", box, 0, self.volume.shape[0] - 1, cancel=self.stop)
                self.slices += len(result.masks)
            session.close()
        except Exception as exc:  # reported in the table
            self.error = f"{type(exc).__name__}: {exc}"


def large_body(masks: int = 65536, size: int = 128) -> bytes:
    """A repropagate body of `masks` full masks of size x size over slices 0..9, refused for its
    margin only after every mask is decoded."""
    from medsam_slicer.server.protocol import encode_mask

    full = encode_mask(np.ones((size, size), bool))
    return json.dumps({"masks": [{"index": n % 10, "mask": full} for n in range(masks)], "corrected_index": 1,
                       "corrected_mask": full, "seed_index": 5, "margin": -2}).encode()


def run_large_body(url: str, token: Optional[str], body: bytes, seconds: float, with_body: bool) -> Dict[str, object]:
    """Warm prompts and health checks for `seconds`, with or without large bodies posted meanwhile."""
    import requests

    from medsam_slicer.server.client import RemoteEngine

    engine = RemoteEngine(url, token=token)
    volume = np.zeros((10, 128, 128), np.int16)
    volume[:, 40:90, 30:100] = 300
    session = engine.open_session(volume, (400, 40))
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    stop = threading.Event()
    bodies: List[float] = []
    errors: List[str] = []

    def poster() -> None:
        with requests.Session() as http:
            while not stop.is_set():
                t0 = time.perf_counter()
                reply = http.post(f"{url}/v1/sessions/{session.session_id}/repropagate", data=body, headers=headers,
                                  timeout=600)
                if reply.status_code != 400:
                    errors.append(f"large body: {reply.status_code} {reply.text[:100]}")
                bodies.append(time.perf_counter() - t0)

    session.segment_slice("k", 4, [30, 40, 90, 100])  # warm: every prompt below is decoder only
    thread = threading.Thread(target=poster, daemon=True)
    if with_body:
        thread.start()
        time.sleep(0.3)
    prompts: List[float] = []
    health: List[float] = []
    with requests.Session() as http:
        end = time.perf_counter() + seconds
        n = 0
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            http.get(f"{url}/v1/health", timeout=60).raise_for_status()
            health.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            session.segment_slice("k", 4, [30 + n % 7, 40, 90, 100])
            prompts.append(time.perf_counter() - t0)
            n += 1
            time.sleep(0.02)
    stop.set()
    if with_body:
        thread.join(600)
    session.close()
    return {"with_body": with_body, "prompts": len(prompts), "bodies": len(bodies),
            "body_s": float(np.median(bodies)) if bodies else float("nan"),
            "prompt_p50_ms": _percentile(prompts, 50), "prompt_p95_ms": _percentile(prompts, 95),
            "prompt_max_ms": max(prompts) * 1000.0, "health_p50_ms": _percentile(health, 50),
            "health_p95_ms": _percentile(health, 95), "health_max_ms": max(health) * 1000.0, "errors": errors}


def large_body_table(url: str, token: Optional[str], seconds: float, masks: int) -> List[Dict[str, object]]:
    body = large_body(masks)
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); large body: {len(body) / 1e6:.1f} MB, {masks} masks "
          f"of 128x128; {seconds:.0f} s per row", flush=True)
    rows = [run_large_body(url, token, body, seconds, with_body) for with_body in (False, True)]
    print()
    print("| concurrent large body | prompts | prompt p50 ms | prompt p95 ms | prompt max ms | health p50 ms "
          "| health p95 ms | health max ms | bodies parsed (median s each) |")
    print("|:---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        parsed = f"{r['bodies']} ({r['body_s']:.2f} s)" if r["with_body"] else "-"
        print(f"| {'yes, back to back' if r['with_body'] else 'no'} | {r['prompts']} | {r['prompt_p50_ms']:.0f} "
              f"| {r['prompt_p95_ms']:.0f} | {r['prompt_max_ms']:.0f} | {r['health_p50_ms']:.1f} "
              f"| {r['health_p95_ms']:.1f} | {r['health_max_ms']:.1f} | {parsed} |")
    return rows


def run_scenario(url: str, token: Optional[str], volume: np.ndarray, users: int, prompts: int, background: bool,
                 seed: int, scenario: int) -> Dict[str, object]:
    from medsam_slicer.server.client import RemoteEngine, Timeouts

    timeouts = Timeouts(connect=5, read=600, upload=600)
    bg = None
    if background:
        bg = Background(RemoteEngine(url, token=token, timeouts=timeouts), (volume - 1 - scenario).astype(volume.dtype))
        bg.start()
        time.sleep(1.0)  # let it occupy the worker
    cold: List[float] = []
    warm: List[float] = []
    errors: List[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(users)

    def user(u: int) -> None:
        rng = np.random.default_rng(seed + u)
        try:
            engine = RemoteEngine(url, token=token, timeouts=timeouts)
            # each user and scenario its own volume (shifted by a few units), so no prompt reuses the
            # embeddings of another user or of an earlier scenario
            shift = 1 + u + 10 * scenario
            session = engine.open_session((volume + shift).astype(volume.dtype), "ct-abdomen")
            h, w = volume.shape[1:]
            slices = rng.permutation(volume.shape[0])[:prompts]
            barrier.wait(timeout=600)
            for index in slices:
                for kind in (cold, warm):
                    cx, cy = int(rng.integers(w // 3, 2 * w // 3)), int(rng.integers(h // 3, 2 * h // 3))
                    half = int(rng.integers(8, max(9, min(h, w) // 4)))
                    box = [max(0, cx - half), max(0, cy - half), min(w - 1, cx + half), min(h - 1, cy + half)]
                    t0 = time.perf_counter()
                    session.segment_slice("k", int(index), box)
                    with lock:
                        kind.append(time.perf_counter() - t0)
            session.close()
        except Exception as exc:
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=user, args=(u,), daemon=True) for u in range(users)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(3600)
    wall = time.perf_counter() - t0
    bg_slices = 0
    if bg is not None:
        bg.stop.set()
        bg.join(600)
        bg_slices = bg.slices
        if bg.error:
            errors.append(f"background: {bg.error}")
    return {
        "users": users, "background": background, "prompts": len(cold) + len(warm),
        "cold_p50_ms": _percentile(cold, 50), "cold_p95_ms": _percentile(cold, 95),
        "warm_p50_ms": _percentile(warm, 50), "warm_p95_ms": _percentile(warm, 95),
        "wall_s": wall, "background_slices": bg_slices, "errors": errors,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server; default: start one here")
    p.add_argument("--token")
    p.add_argument("--checkpoint", help="weights for the server started here")
    p.add_argument("--tiny", action="store_true", help="build a random tiny MedSAM-shaped checkpoint (smoke run)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads in the server (0: torch's default)")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--users", default="1,4,8")
    p.add_argument("--prompts", type=int, default=3, help="slices per user (each prompted twice: cold, warm)")
    p.add_argument("--volume", help="a volume file (default: the CT sample shipped with slicerio)")
    p.add_argument("--slices", type=int, default=0, help="use only the first N slices (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--large-body", action="store_true",
                   help="only: prompt and health latency with and without a concurrent 6.7 MB body")
    p.add_argument("--seconds", type=float, default=10.0, help="--large-body: seconds per row")
    p.add_argument("--body-masks", type=int, default=65536, help="--large-body: masks in the body")
    args = p.parse_args(argv)

    proc = None
    if args.url is None:
        if args.tiny:
            sys.path.insert(0, os.path.join(ROOT, "Testing"))
            from model_factory import TINY, save_checkpoint

            args.checkpoint = save_checkpoint(os.path.join("/tmp", f"medsam_tiny_bench_{os.getpid()}.pth"), TINY)
        elif args.checkpoint is None:
            from medsam_slicer.weights import ensure_weights

            args.checkpoint = ensure_weights(None)
        proc, url = _start_server(args)
    else:
        url = args.url
    try:
        from medsam_slicer.server.client import RemoteEngine

        info = RemoteEngine(url, token=args.token).check()
        if args.large_body:
            print(f"server: {info['architecture']} on {info['device']} ({info['precision']}), "
                  f"medsam-slicer {info['version']}", flush=True)
            rows = large_body_table(url, args.token, args.seconds, args.body_masks)
            errors = [e for r in rows for e in r["errors"]]
            for e in errors[:5]:
                print(f"error: {e}", file=sys.stderr)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"server": info, "cpu": cpu_model(), "large_body": rows}, f, indent=2)
            return 1 if errors else 0
        volume = _load_volume(args.volume)
        if args.slices:
            volume = volume[: args.slices]
        print(f"server: {info['architecture']} on {info['device']} ({info['precision']}), "
              f"medsam-slicer {info['version']}; volume {list(volume.shape)}; {args.prompts} slices per user, "
              "each prompted cold (encoder + decoder) then warm (decoder only)", flush=True)
        rows = []
        for users in [int(u) for u in args.users.split(",")]:
            for background in (False, True):
                row = run_scenario(url, args.token, volume, users, args.prompts, background, args.seed, len(rows))
                rows.append(row)
                print(f"  done: {users} users, background={background}: {row['wall_s']:.1f} s", file=sys.stderr,
                      flush=True)
        print()
        print("| users | long propagation running | prompts | cold p50 ms | cold p95 ms | warm p50 ms | warm p95 ms "
              "| background slices |")
        print("|---:|:---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['users']} | {'yes' if r['background'] else 'no'} | {r['prompts']} | {r['cold_p50_ms']:.0f} "
                  f"| {r['cold_p95_ms']:.0f} | {r['warm_p50_ms']:.0f} | {r['warm_p95_ms']:.0f} "
                  f"| {r['background_slices'] if r['background'] else '-'} |")
        errors = [e for r in rows for e in r["errors"]]
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"server": info, "rows": rows}, f, indent=2)
        return 1 if errors else 0
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
