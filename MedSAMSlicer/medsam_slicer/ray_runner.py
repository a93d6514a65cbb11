"""`medsam-slicer batch --ray [ADDRESS]`: the same cases on a Ray cluster.

- **Cluster**: `--ray ADDRESS` connects to a running cluster (`ray start --head` on one machine,
  `ray start --address=HEAD:6379` on the others; ADDRESS as `ray.init` takes it, e.g. `auto` or
  `ray://head:10001`); `--ray` alone connects to `RAY_ADDRESS` when it is set, else starts a
  local Ray on this machine for the batch and stops it afterwards. A Ray already initialised in
  this process (a script calling `run_batch`) is used as it is and left running.
- **Actors hold the model**: one actor per GPU of the cluster (each with one GPU), or `--workers N`
  actors; on a cluster without GPUs, `--workers` actors (default 1) share the cluster's CPUs,
  each running torch with that many threads. An actor loads the model once and keeps its
  embedding cache; each case is one task on an idle actor.
- **Shared paths, not the object store**: the driver sends each worker the case (absolute paths,
  boxes, options); the worker reads the input and writes the output itself. So every path of the
  manifest (inputs, outputs, a --checkpoint file) must be visible at the same absolute path on
  every node: a shared file system (NFS, a cluster mount), or a single machine. Volumes never pass
  through the driver, which keeps it light; medsam-slicer (with its `ray` extra) must be installed
  on every node in the same version.
- **Failures**: a case that fails (an exception, a bad file, its actor dying) is tried once more,
  on a fresh actor if its actor died, then reported; the batch never stops for one case.
- **Ctrl+C**: queued tasks are cancelled and the actors killed; outputs are written into a
  scratch folder beside the output and moved into place with one rename, so a killed write leaves
  no output file, and the driver removes the scratch folders of the cases that were running.
"""
from __future__ import annotations

import collections
import glob
import logging
import os
import shutil
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .batch import MAX_ATTEMPTS, Case, CaseResult, CaseRunner, EngineSpec
from .errors import InputError, MedSAMError

RAY_HINT = 'pip install "medsam-slicer[ray]"'


def require_ray():
    try:
        import ray
    except ImportError:
        raise InputError(f"--ray needs Ray, which is not installed: {RAY_HINT}") from None
    return ray


class CaseActor:
    """A Ray actor holding one model; `run` is one case."""

    def __init__(self, spec: EngineSpec, threads: int):
        import torch

        torch.set_num_threads(max(1, int(threads)))
        self.runner = CaseRunner(spec)

    def ready(self) -> str:
        """Loads the model; '' when it loaded, else the reason (so the driver can say it in one line)."""
        try:
            self.runner.ensure_engine()
        except MedSAMError as error:
            return str(error)
        except Exception as error:
            return f"{type(error).__name__}: {error}"
        return ""

    def run(self, case: Case, force: bool) -> CaseResult:
        return self.runner.run(case, force)


def _actor_layout(ray, spec: EngineSpec, workers: Optional[int]) -> Tuple[int, dict, int]:
    """(number of actors, their Ray resource options, torch threads each)."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 1)) or 1.0
    if gpus and spec.device in ("auto", "cuda"):
        return (workers or gpus), {"num_gpus": 1, "num_cpus": 1}, max(1, int(cpus // max(1, gpus)))
    count = workers or 1
    share = cpus / count
    per_actor = float(int(share)) if share >= 1 else share  # fractional CPUs rather than actors never placed
    return count, {"num_cpus": per_actor}, max(1, int(share))


def _remove_scratch(output: str) -> None:
    """The scratch folders `volume_io._atomic_write` makes beside an output (a write killed midway)."""
    folder, name = os.path.split(output)
    for path in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp")):
        shutil.rmtree(path, ignore_errors=True)


def run_on_ray(cases: Sequence[Case], spec: EngineSpec, force: bool, record: Callable[[CaseResult], None],
               address: Optional[str] = None, workers: Optional[int] = None, quiet: bool = False) -> int:
    """Runs the cases on Ray, calling `record` with each final result; returns the number of model loads."""
    ray = require_ray()
    from ray.exceptions import RayActorError, RayError

    initialised_here = not ray.is_initialized()
    if initialised_here:
        options = dict(logging_level=logging.WARNING, log_to_driver=not quiet)
        try:
            if address:
                ray.init(address=address, **options)
            else:
                ray.init(include_dashboard=False, **options)
        except Exception as error:  # ConnectionError, ValueError, RuntimeError, ... from Ray's start-up
            where = f"the Ray cluster at '{address}'" if address else "Ray"
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise MedSAMError(f"cannot start or reach {where}: {reason}") from None
    actors: List[object] = []
    pending: Dict[object, Tuple[Case, int, int]] = {}
    try:
        count, resources, threads = _actor_layout(ray, spec, workers)
        count = min(count, len(cases))
        remote_actor = ray.remote(**resources)(CaseActor)
        loads = 0

        def new_actor():
            nonlocal loads
            actor = remote_actor.remote(spec, threads)
            reason = ray.get(actor.ready.remote())
            if reason:
                ray.kill(actor, no_restart=True)
                raise MedSAMError(f"the model could not be loaded on a Ray worker: {reason}")
            loads += 1
            return actor

        actors = [remote_actor.remote(spec, threads) for _ in range(count)]
        reasons = ray.get([actor.ready.remote() for actor in actors])  # load all models in parallel
        if any(reasons):
            raise MedSAMError(f"the model could not be loaded on a Ray worker: {next(r for r in reasons if r)}")
        loads = len(actors)

        queue = collections.deque((case, 1) for case in cases)
        idle = list(range(len(actors)))
        first_error: Dict[int, str] = {}
        while queue or pending:
            while queue and idle:
                index = idle.pop()
                case, attempt = queue.popleft()
                pending[actors[index].run.remote(case, force)] = (case, attempt, index)
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            case, attempt, index = pending.pop(ref)
            try:
                result = ray.get(ref)
            except RayActorError as error:  # the actor's process died (out of memory, node lost, ...)
                _remove_scratch(case.output)
                actors[index] = new_actor()
                result = CaseResult(case.line, case.input_text, case.output_text, "failed",
                                    error=f"Ray worker died: {str(error).strip().splitlines()[0]}")
            except RayError as error:
                result = CaseResult(case.line, case.input_text, case.output_text, "failed",
                                    error=f"Ray task failed: {str(error).strip().splitlines()[0]}")
            idle.append(index)
            if result.status == "failed" and attempt < MAX_ATTEMPTS:
                first_error[case.line] = result.error
                queue.append((case, attempt + 1))
                continue
            result.attempts = attempt
            earlier = first_error.get(case.line)
            if result.status == "failed" and earlier and earlier != result.error:
                result.error = f"{result.error} (first attempt: {earlier})"
            record(result)
        return loads
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)
        for actor in actors:
            ray.kill(actor, no_restart=True)
        for case, _, _ in pending.values():
            _remove_scratch(case.output)
        raise
    finally:
        if initialised_here:
            ray.shutdown()
