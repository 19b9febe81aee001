"""The Ray driver: submit one task per work unit, keep a bounded number in flight, gather records.

Ray imports stay in this module (and workers.ray_task). Tasks receive a unit (keys and byte
ranges) and return a small record; tensors never travel through Ray's object store.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict

from infra.sizes import format_size
from workers.errors import FailsEveryUnit
from workers.evaluation import Evaluation
from workers.records import UnitContext, UnitResult
from workers.units import WorkUnit

__all__ = [
    "ClusterError", "ClusterInfo", "ConversionFailed", "check_device", "start_ray", "run_units",
    "run_evaluation", "unit_concurrency", "warm_workers", "unit_threads", "TaskSize", "task_size",
    "memory_request", "warn_oversized_units", "unit_failure_line", "wait_for_one", "run_queue",
    "QueueOutcome",
]

_log = logging.getLogger(__name__)

# Units sharing one GPU at once (fractional num_gpus). A unit's kernels keep a GPU busy only a
# fraction of the time (reads, copies, writes and hashing around them), so several share it.
UNITS_PER_GPU_ENV = "QUANTFLEET_UNITS_PER_GPU"
_DEFAULT_UNITS_PER_GPU = 4
# Ranged reads in flight per unit (S3 GETs or local preads); a node runs several units.
READ_CONCURRENCY_ENV = "QUANTFLEET_READ_CONCURRENCY"


class ConversionFailed(Exception):
    """Some units failed for good; the message lists every failure. `stopped_by`: the failure
    every unit would meet that stopped the queue, `not_started` units before they began;
    `staged`: finished units stay staged for the re-run (the measure pass keeps nothing)."""

    def __init__(self, failures: list[tuple[WorkUnit, str]], not_started: int = 0,
                 stopped_by: FailsEveryUnit | None = None, *, staged: bool = True) -> None:
        self.failures = failures
        self.not_started = not_started
        lines = [f"{len(failures)} unit(s) failed:"]
        lines += [f"  - {message}" for _, message in failures]
        if stopped_by is not None:
            kept = ("The units finished before stay staged: {} and run the same command again to resume"
                    if staged else "Nothing was converted: {} and run the same command again")
            stopped = f"{not_started} more unit(s) not started: " if not_started else ""
            lines.append(f"  - {stopped}{stopped_by.reason}. " + kept.format(stopped_by.remedy))
        super().__init__("\n".join(lines))


class QueueOutcome(NamedTuple):
    """What `run_queue` gathered: each finished unit's result by unit index, and the failures."""

    results: dict[int, Any]
    failures: list[tuple[WorkUnit, str]]
    not_started: int  # units never started: a FailsEveryUnit stopped the queue
    stopped_by: FailsEveryUnit | None

    def raise_failures(self, *, staged: bool = True) -> None:
        """Raise ConversionFailed listing every failure, in plan order (nothing when none)."""
        if self.failures:
            raise ConversionFailed(sorted(self.failures, key=lambda f: f[0].index), self.not_started,
                                   self.stopped_by, staged=staged)


class ClusterInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    address: str
    nodes: int
    cpus: float
    gpus: float
    memory: float = 0.0  # bytes Ray may schedule for tasks, cluster-wide (0: unknown)
    node_memory: float = 0.0  # the same on the node that has the most (0: unknown)


class ClusterError(Exception):
    """The Ray cluster cannot be reached, or cannot run the conversion as asked; nothing was done."""


# How long a cluster's address may take to accept a connection before it is called unreachable.
_CONNECT_TIMEOUT_S = 10.0


def _check_reachable(target: str) -> None:
    """Refuse, in one line and within seconds, an address nothing answers at: ray.init() retries
    for minutes, printing Ray's own warnings, before it gives up."""
    host, sep, port = target.removeprefix("ray://").rpartition(":")
    if target in ("local", "auto") or not sep or not port.isdigit():
        return  # Ray's own forms; anything else Ray reports itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as error:
        why = error.strerror or str(error) or type(error).__name__
        raise ClusterError(
            f"cannot reach the Ray cluster at {target} ({why}): check --ray-address or RAY_ADDRESS, "
            "or leave both unset to start a local Ray"
        ) from error


def check_device(device: str, cluster: ClusterInfo) -> None:
    """Refuse `--device cuda` on a cluster without a GPU (each unit failed on its worker)."""
    if device == "cuda" and cluster.gpus <= 0:
        raise ClusterError(
            f"--device cuda: the Ray cluster at {cluster.address} has no GPU ({cluster.nodes} node(s), "
            f"{cluster.cpus:g} CPUs); use --device auto (its GPUs where it has them, else the CPUs) "
            "or --device cpu"
        )


def start_ray(address: str | None = None) -> ClusterInfo:
    """Connect to `address` (or RAY_ADDRESS); with neither, start a local Ray (the default)."""
    import ray

    if not ray.is_initialized():
        # "local" starts a new Ray: without it, ray.init() joins whatever cluster `ray start` last
        # started on this machine, which is not what the CLI promises.
        target = address or os.environ.get("RAY_ADDRESS") or "local"
        _check_reachable(target)
        _init_keeping_sigterm_handler(target)
    resources = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return ClusterInfo(
        address=ray.get_runtime_context().gcs_address,
        nodes=len(alive),
        cpus=resources.get("CPU", 0.0),
        gpus=resources.get("GPU", 0.0),
        memory=resources.get("memory", 0.0),
        node_memory=max((n.get("Resources", {}).get("memory", 0.0) for n in alive), default=0.0),
    )


def _init_keeping_sigterm_handler(target: str) -> None:
    """`ray.init` at `target`, keeping this process's SIGTERM handler: Ray replaces it with
    sys.exit(15), silently, where the CLI's stops as Ctrl-C does and says how to resume. Only the
    main thread has handlers to keep (and only there does Ray replace them)."""
    import ray

    main_thread = threading.current_thread() is threading.main_thread()
    own_handler = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        ray.init(
            address=target,
            include_dashboard=False,
            log_to_driver=True,
            logging_level=logging.WARNING,
            # No runtime_env: workers import the project from the driver's environment, and a
            # runtime_env (even env_vars alone) costs every first task its agent's set-up.
        )
    except SystemExit as exit_:
        # Ray's handler, in place while Ray starts (seconds), caught a SIGTERM meant for ours.
        if exit_.code == signal.SIGTERM and callable(own_handler):
            own_handler(signal.SIGTERM, None)
        raise
    if callable(own_handler):
        signal.signal(signal.SIGTERM, own_handler)


def memory_request(unit_memory: int, cluster: ClusterInfo) -> int:
    """The memory (bytes) a unit's task asks Ray for: the plan's estimate, but never more than the
    largest node offers tasks.

    Ray leaves a task that asks for more than any node has pending forever (it only warns), so
    a unit whose estimate (4x its largest tensor: a 405B model's 4.2 GB embedding, a fused MoE
    tensor) exceeds every node hung the conversion. Asking for the largest node's whole memory
    instead runs it there alone: the estimate is generous (4x the largest tensor, whether it is
    quantized or only copied), and a unit that does outgrow its node fails, named, as a worker
    killed for memory rather than waiting.
    """
    if cluster.node_memory <= 0:
        return unit_memory
    return min(unit_memory, int(cluster.node_memory))


def warn_oversized_units(units: Sequence[WorkUnit], cluster: ClusterInfo) -> None:
    """One warning naming the units whose memory estimate no node meets (`memory_request`)."""
    over = [u for u in units if memory_request(u.memory_bytes, cluster) < u.memory_bytes]
    if over:
        largest = max(over, key=lambda u: u.memory_bytes)
        _log.warning(
            "%d unit(s) are estimated to need more memory than any node offers Ray's tasks (%s on "
            "the largest; up to %s for %s): each runs alone on the largest node", len(over),
            format_size(cluster.node_memory), format_size(largest.memory_bytes), largest.file_name)


def stop_ray() -> None:
    """Stop the Ray this process started (or leave the cluster it joined), if any.

    The CLI calls this before the interpreter's exit handlers: Ray's own handler first sleeps
    0.5 s so that late worker logs can print, which a finished conversion does not need (every
    task has returned and reported by then). Measured on the 2-core machine: 1.9 s -> 1.2-1.4 s;
    with the autoscaler monitor killed first (`_kill_own_autoscaler_monitor`), ~0.4 s.
    """
    import ray

    if ray.is_initialized():
        _kill_own_autoscaler_monitor()
        ray.shutdown()


def _kill_own_autoscaler_monitor() -> None:
    """SIGKILL the autoscaler monitor of a Ray this process started, before `ray.shutdown()`.

    `ray.shutdown()` stops the GCS before the monitor; the monitor's SIGTERM handler then reports
    to the gone GCS until Ray kills it after a 1 s grace (and with the GCS alive, it still takes
    ~0.7 s to exit). Its kill is where Ray's own shutdown ends up anyway, on a cluster being torn
    down whole. Measured (a local Ray, idle 2-core machine): `ray.shutdown()` 1.16-1.45 s, and
    0.36-0.43 s with the monitor killed first. Reaches into Ray's private node record (ray is pinned); a
    process that joined a cluster owns no processes there, and anything unexpected leaves the
    shutdown as it was.
    """
    try:
        from ray._private import ray_constants
        from ray._private import worker as ray_worker

        node = getattr(ray_worker, "_global_node", None)
        monitors = [] if node is None else node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, [])
        for info in monitors:
            if info.process.poll() is None:
                info.process.kill()
                info.process.wait(timeout=5)
    except Exception:  # noqa: BLE001 - an optimisation only: ray.shutdown() stops it regardless
        _log.debug("could not stop Ray's autoscaler monitor early", exc_info=True)


def warm_workers(
    cluster: ClusterInfo,
    schemes: Sequence[Any],
    largest: Sequence[int],
    units: int,
    unit_memory: int,
    device: str,
    compile_floor: int | None = None,
    methods: Sequence[str] = (),
    variants: Sequence[tuple[bool, ...]] = (),
) -> list[Any]:
    """Send one warm-up task per worker slot, sized as `run_units` sizes the units' tasks, and
    return at once (the refs: nobody needs to wait on them). `--device cuda` on a cluster without
    a GPU is refused here, before any task (ClusterError).

    The CLI calls this right after planning, before Prefect's temporary server is up: the
    workers' imports and kernel compiles (`workers.warmup`) then overlap with that wait instead of
    stalling the first units. A failed warm-up only loses the time it would have saved.
    """
    from workers.ray_task import warm_up_remote

    check_device(device, cluster)
    size = task_size(cluster, unit_memory, units)
    return [
        warm_up_remote.options(  # type: ignore[call-arg]
            num_cpus=size.threads, num_gpus=size.num_gpus, name="warm up",
        ).remote(tuple(schemes), tuple(largest), device, compile_floor, tuple(methods), tuple(variants))
        for _ in range(min(units, size.slots))
    ]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a positive whole number") from None
    if value < 1:
        raise ValueError(f"{name}={raw!r}: expected a positive whole number")
    return value


def unit_concurrency(cluster: ClusterInfo, unit_memory: int) -> tuple[int, float]:
    """(units to keep in flight, GPUs each asks for), sized from what the cluster has.

    GPU nodes: `QUANTFLEET_UNITS_PER_GPU` (default 4) units share each GPU. CPU nodes: one unit
    per core (each unit's torch uses its one core). Either way no more than the cluster's memory
    holds at the plan's per-unit estimate; Ray's `memory` resource enforces that per node, this
    only keeps the queue of submitted work short so a retried unit does not wait behind it.
    """
    if cluster.gpus > 0:
        per_gpu = _env_int(UNITS_PER_GPU_ENV, _DEFAULT_UNITS_PER_GPU)
        slots, num_gpus = int(cluster.gpus * per_gpu), 1.0 / per_gpu
    else:
        slots, num_gpus = int(cluster.cpus), 0.0
    if cluster.memory > 0 and unit_memory > 0:
        slots = min(slots, int(cluster.memory // unit_memory))
    return max(1, slots), num_gpus


def unit_threads(cluster: ClusterInfo, units: int) -> int:
    """CPU threads (Ray `num_cpus`) each unit's task gets: on CPU nodes, cores left idle when
    there are fewer units than cores go to the units (a 1.5 GiB output in one shard would
    otherwise convert on one core of many), up to one node's cores. One on GPU nodes.

    Depends on the cluster and the plan's unit count only, never on how many units an earlier run
    already finished: float sums over many elements (the error figures) depend on the thread
    count, and a resumed run must record the figures an uninterrupted one would.
    """
    if cluster.gpus > 0 or units < 1:
        return 1
    per_node = max(1, int(cluster.cpus // max(1, cluster.nodes)))
    return max(1, min(per_node, int(cluster.cpus // units)))


class TaskSize(NamedTuple):
    threads: int  # Ray num_cpus of each task
    num_gpus: float  # Ray num_gpus of each task
    slots: int  # tasks that run at once


def task_size(cluster: ClusterInfo, unit_memory: int, units: int) -> TaskSize:
    """How a plan's unit tasks are sized (conversion, the measure pass, the warm-up): threads by
    `unit_threads`, GPU share and concurrency by `unit_concurrency`, each slot `threads` wide."""
    slots, num_gpus = unit_concurrency(cluster, unit_memory)
    threads = unit_threads(cluster, units)
    return TaskSize(threads, num_gpus, max(1, slots // threads))


def _cause(error: BaseException) -> BaseException:
    # Ray wraps task errors; the cause carries our message (unit, file, tensor, figures).
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def _describe(error: BaseException) -> str:
    return str(_cause(error)).strip().splitlines()[-1]


def unit_failure_line(unit: WorkUnit, message: str) -> str:
    """A failure's line names its unit (a worker's own errors do; an OSError's message does not)."""
    if message.startswith(f"unit {unit.index} "):
        return message
    return f"unit {unit.index} ({unit.file_name}): {message}"


def run_units(
    units: Sequence[WorkUnit],
    context: UnitContext,
    *,
    cluster: ClusterInfo,
    max_in_flight: int | None = None,
    on_done: Callable[[WorkUnit, UnitResult], None] | None = None,
) -> list[UnitResult]:
    """Run every unit on the cluster; raise ConversionFailed listing all failures at the end."""
    from workers.ray_task import convert_unit_remote

    check_device(context.device, cluster)
    size = task_size(cluster, max((u.memory_bytes for u in units), default=0), len(units))
    # Twice the slots: the next unit is queued on a worker before the previous one finishes.
    limit = max_in_flight or max(2, size.slots * 2)
    if os.environ.get(READ_CONCURRENCY_ENV):
        context = context.model_copy(update={"read_concurrency": _env_int(READ_CONCURRENCY_ENV, 8)})
    warn_oversized_units(units, cluster)

    def submit(unit: WorkUnit) -> Any:
        return convert_unit_remote.options(
            num_cpus=size.threads,
            num_gpus=size.num_gpus,
            memory=memory_request(unit.memory_bytes, cluster),
            name=f"convert {unit.file_name}",
        ).remote(unit, context)

    outcome = run_queue(units, submit, limit, on_done=on_done)
    outcome.raise_failures()
    return [outcome.results[u.index] for u in units]


def run_queue(
    units: Sequence[WorkUnit],
    submit: Callable[[WorkUnit], Any],
    limit: int,
    *,
    on_done: Callable[[WorkUnit, Any], None] | None = None,
    on_settled: Callable[[WorkUnit], None] | None = None,
) -> QueueOutcome:
    """Submit units in plan order (`submit` returns the task's ObjectRef), at most `limit` in
    flight; gather each result and each failure. `on_done` sees each result as it comes,
    `on_settled` each unit that finished or failed. A FailsEveryUnit starts no further unit."""
    import ray

    pending = list(units)
    pending.reverse()  # pop() from the end takes units in plan order
    in_flight: dict[ray.ObjectRef, WorkUnit] = {}
    results: dict[int, Any] = {}
    failures: list[tuple[WorkUnit, str]] = []
    not_started = 0
    stopped_by: FailsEveryUnit | None = None  # the failure that stopped the queue
    while pending or in_flight:
        while pending and len(in_flight) < limit:
            unit = pending.pop()
            in_flight[submit(unit)] = unit
        done = wait_for_one(list(in_flight))
        for ref in done:
            unit = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as error:  # noqa: BLE001 - every failure is collected and reported
                failures.append((unit, unit_failure_line(unit, _describe(error))))
                # The failure is listed again at the end (ConversionFailed); -v shows it as it happens.
                _log.info("unit %d failed: %s", unit.index, _describe(error))
                cause = _cause(error)
                if isinstance(cause, FailsEveryUnit):
                    # Every unit still queued would be read and quantized only to fail the same
                    # way; those in flight finish (or fail) and stay staged for the re-run.
                    stopped_by = stopped_by or cause
                    not_started += len(pending)
                    pending.clear()
            else:
                results[unit.index] = result
                if on_done is not None:
                    on_done(unit, result)
            if on_settled is not None:
                on_settled(unit)
    return QueueOutcome(results, failures, not_started, stopped_by)


def wait_for_one(refs: list[Any]) -> list[Any]:
    """`ray.wait` for the first of `refs` to finish, letting a signal's exception through whole.

    Ray runs Python's signal handlers inside its wait and passes on a KeyboardInterrupt, but any
    other exception a handler raises there comes out as a SystemError ("returned a result with an
    exception set"): Prefect's SIGTERM handler (a TerminationSignal, during a flow run) did, and a
    `kill` of a conversion printed that traceback instead of stopping it. The handler's exception
    is raised as itself, so Prefect records the run as crashed and the CLI says how to resume.
    """
    import ray

    try:
        done, _ = ray.wait(refs, num_returns=1)
    except SystemError as error:
        raised = error.__cause__ or error.__context__
        if isinstance(raised, BaseException) and not isinstance(raised, Exception):
            raise raised from None
        raise
    return done


def run_evaluation(cluster: ClusterInfo, original: str, quantized: str, **options: object) -> Evaluation:
    """Run the model-level evaluation as one Ray task (on a GPU when the cluster has one).

    The task asks for one CPU and lets torch use every core of its node (the conversion tasks
    have finished by then). Errors come back as raised in the task.
    """
    import ray

    from workers.evaluation.ray_task import evaluate_remote

    remote: Any = evaluate_remote.options(
        num_cpus=1, num_gpus=1 if cluster.gpus > 0 else 0, name=f"evaluate {quantized}"
    )
    ref = remote.remote(original, quantized, threads=0, **options)
    try:
        result: Evaluation = ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        cause = error.cause if isinstance(getattr(error, "cause", None), Exception) else None
        if cause is not None:
            raise cause from error
        raise
    return result
