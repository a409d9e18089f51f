"""Run the chains of one estimate on every core, or on several devices.

The chains of an estimate are independent: chain ``c`` draws its noise and minibatches from its
own generators (seeded from ``SeedSequence(seed).spawn(C)[c]``), so a group of chains run on
another core or device yields exactly the numbers it yields in the full run. This module splits
the chains into contiguous groups, runs each group with
:func:`devinterp.analyses.sampling.run_chains` (passed in, so that this module does not import
the sampling module) and merges the groups' reports, chunk by chunk, in chain order. On the
lean path (large models) each worker runs its chains one after the other in one chain state
instead (:func:`group_chunks` with ``one_by_one``), so the memory does not grow with the chains,
and its chunks come one chain at a time.

Backends:

The cores used are PyTorch's intra-op thread budget (:func:`core_budget`: every core unless
``OMP_NUM_THREADS`` or ``torch.set_num_threads`` says otherwise); each worker gets
``budget // workers`` intra-op threads, so the total stays within the budget.

- ``"process"``: one forked child process per group (CPU only; POSIX). The child inherits the
  prepared target, so any ``loss_fn`` works (closures and lambdas need no pickling); it runs with
  ``budget // groups`` intra-op threads and sends its chunks back through a pipe. No GIL is shared.
- ``"thread"``: one thread per group on private copies of the sampling buffers; on CPU the
  intra-op threads are set to ``cores // groups`` for the run. The only backend for CUDA (a
  forked child cannot use CUDA), with one device per group when several are given.

What is measured (``benchmarks/llc_throughput.py --machine-defaults --impls ours,ours_process``,
``benchmarks/llc_memory.py``; docs/llc.md): on the loaded 2-core machine, 4 chains of a
206k-parameter attention-only transformer took 253 s on threads against 408 s on processes
(one round), and threads use less memory (a forked worker keeps ~1.2× the parameters of
private pages of its own there): threads are the default. Setting :data:`SHARE_HEAP` makes a
parallel lean run on CPU threads share one malloc arena between the process's threads
(:func:`share_heap`), so that the workers reuse each other's freed heap (opt-in: it changes
glibc's settings for the whole process).

:func:`iter_chunks` is a generator of :class:`ChainChunk` records: consumers can report progress
per chunk, and closing it early (a budget, a divergence) stops every worker.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from devinterp.errors import InvalidInputError

#: Runs estimated to take less than this many seconds of sequential work stay in one thread
#: with ``workers="auto"`` (forking and per-group model copies cost ~0.1 s). The estimate is
#: chains × steps × the measured time of one gradient (``SamplingTarget.gradient_seconds``).
MIN_PARALLEL_SECONDS = 1.0
BACKENDS = ("process", "thread")


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def core_budget() -> int:
    """The cores the chains may use: PyTorch's intra-op thread count (all cores by default;
    ``OMP_NUM_THREADS`` or ``torch.set_num_threads`` lower it, e.g. in a process that shares the
    machine with others)."""
    return max(1, torch.get_num_threads())


def fork_available() -> bool:
    """Whether the ``"process"`` backend can be used: ``os.fork`` exists and this process may
    have children (a daemonic multiprocessing worker may not)."""
    import multiprocessing as mp

    return hasattr(os, "fork") and sys.platform != "win32" and not mp.current_process().daemon


@dataclass(frozen=True)
class ChainChunk:
    """Steps ``start..stop-1`` of every chain.

    Attributes:
        start, stop: the steps covered.
        losses: ``(C, stop - start)`` minibatch losses on the target's device.
        acceptance: ``(step, (C,) acceptance)`` for the checked steps in the chunk.
        final_params: ``(C, D)`` parameters after the last step, on the last chunk only.
        chains: the chains (indices in the run) whose rows the chunk holds, or None: every
            chain (a merged chunk of a run that advances its chains together).
    """

    start: int
    stop: int
    losses: Tensor
    acceptance: tuple[tuple[int, Tensor], ...]
    final_params: Tensor | None = None
    #: ``(C, stop - start)`` discretisation corrections (``StepInfo.correction``), or None.
    corrections: Tensor | None = None
    chains: tuple[int, ...] | None = None


class StepLimit:
    """How many steps every chain must still run (lowered when a chain diverges, so that a run
    whose chains go one after the other stops each later chain there, and the diverged chain at
    its next chunk). Written by the consumer only; shared memory for forked workers.

    Args:
        num_steps: the run's steps (the limit until lowered).
        processes: the workers are forked processes.
    """

    def __init__(self, num_steps: int, *, processes: bool = False):
        if processes:
            import multiprocessing as mp

            self._value: Any = mp.get_context("fork").RawValue("q", int(num_steps))
        else:
            self._value = _Box(int(num_steps))

    def __call__(self) -> int:
        return int(self._value.value)

    def lower(self, steps: int) -> None:
        if steps < self._value.value:
            self._value.value = int(steps)


@dataclass
class _Box:
    value: int


#: What a worker sends when its group of chains is done.
_DONE = "done"


@dataclass(frozen=True)
class Plan:
    """How the chains of one run are executed.

    Attributes:
        groups: chain indices per worker (contiguous, in order).
        devices: the device of each group.
        backend: ``"inline"`` (one group, this thread), ``"thread"`` or ``"process"``.
        threads: intra-op threads per worker (CPU), or None to leave the setting alone.
    """

    groups: tuple[tuple[int, ...], ...]
    devices: tuple[torch.device, ...]
    backend: str
    threads: int | None

    @property
    def workers(self) -> int:
        return len(self.groups)


def split(num_chains: int, parts: int) -> tuple[tuple[int, ...], ...]:
    """``num_chains`` chain indices in ``parts`` contiguous groups of near-equal size."""
    parts = max(1, min(parts, num_chains))
    bounds = [round(i * num_chains / parts) for i in range(parts + 1)]
    return tuple(tuple(range(bounds[i], bounds[i + 1])) for i in range(parts))


def check_workers(workers: Any) -> None:
    """Validate a ``workers=`` argument."""
    if isinstance(workers, str):
        if workers != "auto":
            raise InvalidInputError(f"workers must be a positive int or 'auto', got {workers!r}")
        return
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise InvalidInputError(f"workers must be a positive int or 'auto' (1: run the chains "
                                f"one after the other in this thread), got {workers!r}")


def _devices(devices: Any, default: torch.device) -> tuple[torch.device, ...] | None:
    if devices is None:
        return None
    if isinstance(devices, (str, torch.device)):
        devices = [devices]
    out = []
    for d in devices:
        try:
            dev = torch.device(d)
        except (RuntimeError, TypeError):
            raise InvalidInputError(f"devices: {d!r} is not a torch device") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise InvalidInputError(f"device {dev} requested but CUDA is not available")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise InvalidInputError(f"device {dev} requested but only "
                                        f"{torch.cuda.device_count()} CUDA device(s) exist")
        out.append(dev)
    if not out:
        raise InvalidInputError("devices is empty: give at least one device")
    if len(set(out)) != len(out):
        raise InvalidInputError(f"devices lists a device twice: {[str(d) for d in out]}")
    return tuple(out)


def plan(target: Any, *, num_chains: int, estimated_seconds: float | Callable[[], float],
         compiled: bool,
         workers: int | str = "auto", devices: Sequence[Any] | None = None,
         backend: str | None = None) -> Plan:
    """Decide how to run ``num_chains`` chains. The results never depend on the decision.

    Args:
        target: the prepared target (its ``device``).
        num_chains: C.
        estimated_seconds: the sequential run's estimated wall time (for ``"auto"``), or a
            function returning it (called only when the rule needs it: it may time a step).
        compiled: whether the run uses the compiled SGLD step (then it stays in one thread:
            compiled code is specialised on the number of chains and compiling in every worker
            would cost more than it saves).
        workers: ``"auto"``: on CPU, ``min(C, core_budget())`` workers when the run is
            estimated at ``MIN_PARALLEL_SECONDS`` or more, else 1 (on the lean path a second
            worker adds its chain state, activations and heap holes: 4.1–4.4× the parameters
            of extra memory for 4 chains of a 10M-parameter transformer on 2 threads against
            2.9× with one, 4.9× on 2 processes, whatever the number of chains,
            ``benchmarks/llc_memory.py``; pass ``workers=1`` where memory binds most); on one
            GPU, 1 (the chains
            are batched); with ``devices``, one per device. An int forces that many (1: sequential).
        devices: several devices to spread the chains over (one group each, threads).
        backend: ``"process"`` or ``"thread"``; None: threads.
    """
    check_workers(workers)
    if backend is not None and backend not in BACKENDS:
        raise InvalidInputError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    devs = _devices(devices, target.device)
    if devs is not None and len(devs) > 1:
        count = len(devs) if workers == "auto" else min(int(workers), len(devs))
        groups = split(num_chains, count)
        cpu = all(d.type == "cpu" for d in devs[:len(groups)])
        inline = len(groups) == 1 and devs[0] == target.device
        return Plan(groups, devs[:len(groups)], "inline" if inline else "thread",
                    _threads_per_worker(len(groups)) if cpu and len(groups) > 1 else None)
    device = devs[0] if devs else target.device
    if device != target.device:  # one other device: the chains run there, on a replica
        return Plan(split(num_chains, 1), (device,), "thread", None)
    if workers == "auto":
        if device.type != "cpu" or compiled or num_chains < 2 or core_budget() < 2:
            count = 1
        elif (estimated_seconds() if callable(estimated_seconds)
              else estimated_seconds) < MIN_PARALLEL_SECONDS:
            count = 1
        else:
            count = min(num_chains, core_budget())
    else:
        count = min(int(workers), num_chains)
        if compiled and count > 1:
            count = 1
    groups = split(num_chains, count)
    if len(groups) == 1:
        return Plan(groups, (device,), "inline", None)
    if device.type != "cpu":
        chosen = "thread"
    elif backend is None:
        chosen = "thread"
    else:
        chosen = backend
        if chosen == "process" and not fork_available():
            raise InvalidInputError("backend='process' needs os.fork (POSIX) in a process that may "
                                    "have children (not a daemonic worker); use 'thread'")
    threads = _threads_per_worker(len(groups)) if device.type == "cpu" else None
    return Plan(groups, (device,) * len(groups), chosen, threads)


def _threads_per_worker(workers: int) -> int:
    return max(1, core_budget() // workers)


# --------------------------------------------------------------------------------------------
# running groups
# --------------------------------------------------------------------------------------------
RunFn = Callable[..., Iterator[tuple[int, Any, Any]]]


def group_chunks(run: RunFn, target: Any, ids: Sequence[int], num_steps: int, chunk: int,
                 run_kwargs: dict[str, Any], *, one_by_one: bool = False,
                 limit: Callable[[], int] | None = None) -> Iterator[ChainChunk]:
    """Run one group of chains in this thread, as a :class:`ChainChunk` every ``chunk`` steps.

    ``one_by_one`` (the lean path): the chains run one after the other, each to its end, in
    one chain state (reset to w* at each chain's start), instead of all together: chain ``c``
    draws the same numbers either way (its own generators), so the traces are the same, and
    only one chain's parameters exist at a time. Each chunk then holds one chain
    (``ChainChunk.chains``) and no final parameters; a chain stops at the first chunk boundary
    at or after ``limit()`` steps (a diverged chain's run is cut there).
    """
    if not one_by_one:
        yield from _chunks(run, target, ids, num_steps, chunk, run_kwargs)
        return
    restore = run_kwargs.get("restore_rng", True)
    saved = None
    if restore:  # one save for the group (each chain's run would otherwise restore it)
        saved = (torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d))
                                         for d in {target.device} if d.type == "cuda"])
    # the compile rule would see one chain (a run of one chain at a time is never compiled:
    # the lean path is eager)
    kwargs = dict(run_kwargs, restore_rng=False, compile=False)
    try:
        for c in ids:
            for part in _chunks(run, target, [c], num_steps, chunk, kwargs, keep_final=False,
                                limit=limit):
                yield replace(part, chains=(c,))
    finally:
        target.release_buffers()  # the chain state and the model copy
        if saved is not None:
            torch.set_rng_state(saved[0])
            for d, state in saved[1]:
                torch.cuda.set_rng_state(state, d)


def _chunks(run: RunFn, target: Any, ids: Sequence[int], num_steps: int, chunk: int,
            run_kwargs: dict[str, Any], *, keep_final: bool = True,
            limit: Callable[[], int] | None = None) -> Iterator[ChainChunk]:
    """The chains ``ids`` advanced together, a chunk every ``chunk`` steps."""
    buf = torch.empty(len(ids), min(chunk, num_steps), device=target.device)
    acc: list[tuple[int, Tensor]] = []
    cbuf = None  # the discretisation corrections, when the run reports them
    start = 0
    gen = run(target, chain_ids=ids, num_steps=num_steps, **run_kwargs)
    try:
        for step, state, info in gen:
            buf[:, step - start] = info.loss
            if getattr(info, "correction", None) is not None:
                if cbuf is None:
                    cbuf = torch.full_like(buf, float("nan"))
                cbuf[:, step - start] = info.correction
            if info.acceptance is not None:
                acc.append((step, info.acceptance.detach().clone()))
            if step + 1 - start == buf.shape[1] or step + 1 == num_steps:
                final = None
                if step + 1 == num_steps and keep_final:
                    final = state.params
                    work = getattr(target, "_work", None)
                    if work is not None and _shares(final, work):
                        target.release_buffers()  # the lean path's buffer changes hands, no copy
                yield ChainChunk(start, step + 1, buf[:, :step + 1 - start].clone(), tuple(acc),
                                 final, None if cbuf is None
                                 else cbuf[:, :step + 1 - start].clone())
                acc = []
                start = step + 1
                if limit is not None and start < num_steps and start >= limit():
                    return
    finally:
        gen.close()


def _run_group(run: RunFn, target: Any, ids: Sequence[int], num_steps: int, chunk: int,
               run_kwargs: dict[str, Any], emit: Callable[[ChainChunk], None],
               stop: Callable[[], bool], one_by_one: bool = False,
               limit: Callable[[], int] | None = None) -> None:
    gen = group_chunks(run, target, ids, num_steps, chunk, run_kwargs, one_by_one=one_by_one,
                       limit=limit)
    try:
        for c in gen:
            emit(c)
            if stop():
                return
    finally:
        gen.close()


def _shares(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _merge(parts: list[ChainChunk], device: torch.device) -> ChainChunk:
    first = parts[0]
    if any(p.start != first.start or p.stop != first.stop for p in parts):
        raise RuntimeError("chain groups reported different chunks")  # cannot happen
    losses = torch.cat([p.losses.to(device) for p in parts], 0)
    steps = [s for s, _ in first.acceptance]
    acc = tuple((s, torch.cat([p.acceptance[i][1].to(device) for p in parts], 0))
                for i, s in enumerate(steps))
    final = None
    if all(p.final_params is not None for p in parts):
        final = (parts[0].final_params if len(parts) == 1
                 else torch.cat([p.final_params.to(device) for p in parts], 0))
    corr = None
    if all(p.corrections is not None for p in parts):
        corr = torch.cat([p.corrections.to(device) for p in parts], 0)
    return ChainChunk(first.start, first.stop, losses, acc, final, corr)


def iter_chunks(run: RunFn, target: Any, the_plan: Plan, *, num_steps: int, chunk: int,
                run_kwargs: dict[str, Any], lean: bool = False,
                limit: StepLimit | None = None) -> Iterator[ChainChunk]:
    """Run the plan's groups and yield their chunks.

    Closing the generator stops the workers (threads finish their current step; child
    processes are terminated).

    Args:
        run: :func:`devinterp.analyses.sampling.run_chains`.
        target: the prepared target (must offer ``replica_for(device)``).
        the_plan: from :func:`plan`.
        num_steps: total steps.
        chunk: steps per reported chunk.
        run_kwargs: the other keyword arguments of ``run`` (``num_chains``, ``seed``, ...).
        lean: the run takes the lean path: each worker runs its chains one after the other in
            one chain state (:func:`group_chunks` with ``one_by_one``), so the extra memory is
            one chain state and one working memory per worker, whatever the number of chains;
            the chunks come as the workers make them, one chain each (``ChainChunk.chains``),
            without final parameters. A MALA check runs alone (:class:`CheckGate`), so the
            workers together hold no more than one check buffer and one check's working memory,
            as a sequential run does. Otherwise every chunk holds every chain (the groups'
            chunks merged, in step order).
        limit: with ``lean``, the steps a chain must still run (:class:`StepLimit`: lowered by
            the consumer when a chain diverges); created before any worker starts.
    """
    check = None
    if lean and the_plan.backend != "inline" and run_kwargs.get("acceptance_steps"):
        check = CheckGate(the_plan.workers, processes=the_plan.backend == "process",
                          trim=the_plan.devices[0].type == "cpu")
    if the_plan.backend == "inline":
        yield from group_chunks(run, target, the_plan.groups[0], num_steps, chunk, run_kwargs,
                                one_by_one=lean, limit=limit)
    elif the_plan.backend == "thread":
        yield from _threads(run, target, the_plan, num_steps, chunk, run_kwargs, lean, check,
                            limit)
    else:
        yield from _processes(run, target, the_plan, num_steps, chunk, run_kwargs, lean, check,
                              limit)


def _return_free_memory() -> None:
    """Give the C heap's free pages back to the system before the workers start (glibc's
    ``malloc_trim``; a no-op elsewhere). Memory this thread freed (the evaluation of L(w*),
    earlier runs) stays mapped in its heap otherwise, where worker threads (their own malloc
    arenas) and forked workers (their own copies) cannot reuse it, so every worker would add
    its whole working memory on top of it."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None

#: Whether a parallel lean run on CPU threads makes the process's threads share glibc's malloc
#: arenas (:func:`share_heap`). Off by default: the setting is process-wide and lasting (every
#: later thread of the user's process shares arenas, a lock per ``malloc``) for a gain of
#: 0-0.3x the parameters measured on a 10M-parameter transformer. Set it to True before the
#: first such run where that memory matters.
SHARE_HEAP = False
_M_ARENA_MAX = -8  # glibc's mallopt parameter
_HEAP_SHARED = False


def share_heap() -> bool:
    """Make threads created from now on share the existing malloc arenas (glibc's
    ``mallopt(M_ARENA_MAX, 1)``; a no-op elsewhere or when :data:`SHARE_HEAP` is False).

    By default glibc gives every thread its own arena, and the heap a worker thread's
    forward/backward passes leave free stays resident in that arena, where the other worker
    cannot reuse it, and ``malloc_trim`` does not give back the top of a thread's arena. With
    one arena the workers reuse each other's freed blocks. Measured on a 10M-parameter
    transformer, 4 chains on 2 threads (``benchmarks/llc_memory.py``, docs/llc.md): 5.5–5.7×
    the parameters of extra memory against 6.0–6.3× when no other thread had an arena yet; when
    other threads already have arenas (the benchmark's sampling thread) the workers are dealt
    out round-robin over them and the gain is 0–0.3×. CPU time unchanged within noise. The
    setting is process-wide and lasts (glibc caches the arena limit): later threads of this
    process share arenas too, at the cost of a lock per ``malloc``.
    Called once, before the first parallel lean run's worker threads start.

    Returns:
        Whether the setting is in effect.
    """
    global _HEAP_SHARED
    if _HEAP_SHARED or not SHARE_HEAP:
        return _HEAP_SHARED
    try:
        import ctypes

        _HEAP_SHARED = bool(ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, 1))
    except (OSError, AttributeError):
        pass
    return _HEAP_SHARED


def return_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; a no-op
    elsewhere): before a sequential lean run's MALA check, whose buffer and passes would
    otherwise come on top of what the last chain step left free."""
    _return_free_memory()


class CheckGate:
    """Lets a MALA check of a parallel lean run run alone.

    A check needs a ``(D,)`` buffer and two forward/backward passes; run beside the other
    workers' steps it would add both to their working memory (activations, gradients in flight,
    the allocator's holes: ~0.8× the parameters per worker on a 10M-parameter transformer,
    ``benchmarks/llc_memory.py``). A chain step of any worker enters :meth:`step`; a check
    enters :meth:`check`, which waits until the steps in progress are done, keeps new ones out
    and first gives the freed heap back to the system (``malloc_trim``), so that a check adds
    to the workers' chain states one check buffer and one worker's working memory, as in a
    sequential run. Checks are a few steps of a run; results do not depend on the order in which the
    workers' independent chains take their turns.

    Args:
        workers: the number of workers.
        processes: the workers are forked processes (multiprocessing primitives) or threads.
        trim: call ``malloc_trim`` when a check starts (CPU runs).
    """

    def __init__(self, workers: int, *, processes: bool = False, trim: bool = True):
        if processes:
            import multiprocessing as mp

            ctx = mp.get_context("fork")
            self._turnstile, self._room = ctx.Lock(), ctx.Semaphore(workers)
        else:
            self._turnstile, self._room = threading.Lock(), threading.Semaphore(workers)
        self.workers, self.trim = workers, trim

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One chain step of one worker (waits while a check runs)."""
        if not self._turnstile.acquire(False):  # a check runs or waits for its turn
            if self.trim:  # a process's heap: give it back while waiting (threads: the check does)
                _return_free_memory()
            self._turnstile.acquire()
        self._turnstile.release()
        self._room.acquire()
        try:
            yield
        finally:
            self._room.release()

    @contextlib.contextmanager
    def check(self) -> Iterator[None]:
        """One MALA check, alone (waits for the steps in progress to finish)."""
        with self._turnstile:
            for _ in range(self.workers):
                self._room.acquire()
            try:
                if self.trim:
                    _return_free_memory()
                yield
            finally:
                for _ in range(self.workers):
                    self._room.release()


def _threads(run: RunFn, target: Any, the_plan: Plan, num_steps: int, chunk: int,
             run_kwargs: dict[str, Any], lean: bool = False, check: CheckGate | None = None,
             limit: StepLimit | None = None) -> Iterator[ChainChunk]:
    inbox: queue.Queue = queue.Queue()
    stop = threading.Event()
    replicas = [target.replica_for(dev) for dev in the_plan.devices]
    if lean and len(set(the_plan.devices)) == 1:
        for rep in replicas:
            rep.lean_gate = check

    def body(g: int) -> None:
        try:
            dev = the_plan.devices[g]
            if dev.type == "cuda" and dev.index is not None:  # "cuda": the current device
                torch.cuda.set_device(dev)
            _run_group(run, replicas[g], the_plan.groups[g], num_steps, chunk,
                       dict(run_kwargs, restore_rng=False), lambda c: inbox.put((g, c)),
                       stop.is_set, lean, limit)
            inbox.put((g, _DONE))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            inbox.put((g, exc))

    previous = torch.get_num_threads()
    if the_plan.threads is not None:
        torch.set_num_threads(the_plan.threads)
    saved_rng = torch.get_rng_state()
    cuda_rng = [(d, torch.cuda.get_rng_state(d)) for d in set(the_plan.devices)
                if d.type == "cuda"]
    threads = [threading.Thread(target=body, args=(g,), daemon=True,
                                name=f"devinterp-chains-{g}") for g in range(the_plan.workers)]
    if any(d.type == "cpu" for d in the_plan.devices):
        if lean:  # the lean path: the workers' heap holes would add up
            share_heap()
        _return_free_memory()
    try:
        for t in threads:
            t.start()
        yield from _collect(inbox.get, the_plan, target.device, num_steps, lean)
    finally:
        stop.set()
        for t in threads:
            t.join()
        torch.set_rng_state(saved_rng)
        for d, state in cuda_rng:
            torch.cuda.set_rng_state(state, d)
        if the_plan.threads is not None:
            torch.set_num_threads(previous)


def _collect(receive: Callable[[], tuple[int, Any]], the_plan: Plan, device: torch.device,
             num_steps: int, one_by_one: bool = False) -> Iterator[ChainChunk]:
    """The groups' chunks; a worker's exception is raised here.

    ``one_by_one``: each chunk as it comes (one chain each), until every worker is done.
    Otherwise the groups' chunks of the same steps merged into one, in step order.
    """
    if one_by_one:
        live = set(range(the_plan.workers))
        while live:
            g, item = receive()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, str) and item == _DONE:
                live.discard(g)
                continue
            yield item
        return
    pending: list[list[ChainChunk]] = [[] for _ in the_plan.groups]
    while True:
        while not all(pending):
            g, item = receive()
            if isinstance(item, BaseException):
                raise item
            if not (isinstance(item, str) and item == _DONE):  # (after its last chunk)
                pending[g].append(item)
        merged = _merge([p.pop(0) for p in pending], device)
        yield merged
        if merged.stop >= num_steps:
            return


# ---- processes -------------------------------------------------------------------------------
def _to_numpy(c: ChainChunk) -> tuple:
    return (c.start, c.stop, c.losses.cpu().numpy(),
            tuple((s, a.cpu().numpy()) for s, a in c.acceptance),
            None if c.final_params is None else c.final_params.detach().cpu().numpy(),
            None if c.corrections is None else c.corrections.cpu().numpy(), c.chains)


def _from_numpy(item: tuple) -> ChainChunk:
    start, stop, losses, acc, final, corr, chains = item
    return ChainChunk(start, stop, torch.from_numpy(losses),
                      tuple((s, torch.from_numpy(a)) for s, a in acc),
                      None if final is None else torch.from_numpy(final),
                      None if corr is None else torch.from_numpy(corr), chains)


def _child(run: RunFn, target: Any, ids: Sequence[int], threads: int | None, num_steps: int,
           chunk: int, run_kwargs: dict[str, Any], conn: Any, lean: bool = False,
           check: CheckGate | None = None, limit: StepLimit | None = None) -> None:
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        if lean:
            target.release_buffers()  # (copy-on-write pages of the parent's, if any)
            target.lean_gate = check  # checks run alone

        def send(c: ChainChunk) -> None:
            conn.send(("chunk", _to_numpy(c)))

        _run_group(run, target, ids, num_steps, chunk, dict(run_kwargs, restore_rng=False),
                   send, lambda: False, lean, limit)
        conn.send((_DONE, None))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        text = "".join(traceback.format_exception(exc))
        try:
            pickle.loads(pickle.dumps(exc))
            same = exc
        except Exception:  # noqa: BLE001 - e.g. an exception with keyword-only arguments
            same = None
        conn.send(("error", (type(exc).__name__, str(exc), text, same)))
    finally:
        conn.close()


def _processes(run: RunFn, target: Any, the_plan: Plan, num_steps: int, chunk: int,
               run_kwargs: dict[str, Any], lean: bool = False,
               check: CheckGate | None = None, limit: StepLimit | None = None
               ) -> Iterator[ChainChunk]:
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("fork")
    procs, conns = [], []
    _return_free_memory()
    try:
        for g, ids in enumerate(the_plan.groups):
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, name=f"devinterp-chains-{g}", daemon=True,
                               args=(run, target, ids, the_plan.threads, num_steps, chunk,
                                     run_kwargs, send, lean, check, limit))
            proc.start()
            send.close()
            procs.append(proc)
            conns.append(recv)
        live = dict(enumerate(conns))
        finished: set[int] = set()
        ready: list[tuple[int, Any]] = []

        def receive() -> tuple[int, Any]:
            while not ready:
                if not live:
                    raise RuntimeError("chain workers exited before finishing")
                for conn in wait(list(live.values())):
                    g = conns.index(conn)
                    try:
                        kind, payload = conn.recv()
                    except EOFError:
                        del live[g]
                        if g not in finished:
                            procs[g].join()
                            ready.append((g, RuntimeError(
                                f"chain worker {g} (chains {list(the_plan.groups[g])}) died "
                                f"with exit code {procs[g].exitcode}")))
                        continue
                    item = _decode(kind, payload, g)
                    if kind in ("error", _DONE):
                        finished.add(g)
                    ready.append((g, item))
            return ready.pop(0)

        yield from _collect(receive, the_plan, target.device, num_steps, lean)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join()
        for c in conns:
            c.close()


def _decode(kind: str, payload: Any, g: int) -> Any:
    if kind == "chunk":
        return _from_numpy(payload)
    if kind == _DONE:
        return _DONE
    name, text, tb, exc = payload
    if exc is not None:
        return exc
    return RuntimeError(f"chain worker {g} failed with {name}: {text}\n{tb}")
