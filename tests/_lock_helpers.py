"""Processes for the single-writer tests: a slow writer, a second writer, a reader (run as scripts)."""

from __future__ import annotations

import json
import sys
import time

import torch


def weights(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)}


def writer(root: str, steps: int, pause: float, go_file: str) -> None:
    """Save step 0, say "ready", wait for ``go_file``, then save the other steps with pauses."""
    from pathlib import Path

    from devinterp.store import SnapshotStore

    store = SnapshotStore(root, mode="a")
    for step in range(steps):
        store.save(step, weights(step), {"train_loss": 1.0 / (step + 1)})
        if step == 0:
            print("ready", flush=True)
            while not Path(go_file).exists():
                time.sleep(0.01)
        time.sleep(pause)
    store.close()
    print("done", flush=True)


def holder(root: str) -> None:
    """Take the lock, save one snapshot, then wait to be killed."""
    from devinterp.store import SnapshotStore

    store = SnapshotStore(root, mode="a")
    store.save(0, weights(0))
    print("ready", flush=True)
    time.sleep(600)


def second_writer(root: str) -> None:
    from devinterp.errors import StoreLockedError
    from devinterp.store import SnapshotStore

    try:
        SnapshotStore(root, mode="a").save(0, weights(99))
    except StoreLockedError as exc:
        print(json.dumps({"refused": True, "message": str(exc), "holder": exc.holder}), flush=True)
        return
    print(json.dumps({"refused": False}), flush=True)


def reader(root: str, stop_file: str) -> None:
    """Re-read the store until ``stop_file`` exists; every listed snapshot must load with its checksum."""
    from pathlib import Path

    from devinterp.store import SnapshotStore

    reads = errors = 0
    seen: list[int] = []
    while True:
        stop = Path(stop_file).exists()
        try:
            store = SnapshotStore(root)
            for step in store.steps():
                snap = store.load(step)
                if not torch.equal(snap.state_dict["w"], weights(step)["w"]):
                    raise AssertionError(f"step {step} holds other weights")
                reads += 1
            if not seen:
                print("reading", flush=True)
            seen = store.steps()
        except Exception as exc:  # reported, counted
            errors += 1
            print(f"reader error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        if stop:
            break
        time.sleep(0.01)
    print(json.dumps({"reads": reads, "errors": errors, "last_steps": seen}), flush=True)


if __name__ == "__main__":
    what, *rest = sys.argv[1:]
    if what == "writer":
        writer(rest[0], int(rest[1]), float(rest[2]), rest[3])
    elif what == "holder":
        holder(rest[0])
    elif what == "second":
        second_writer(rest[0])
    elif what == "reader":
        reader(rest[0], rest[1])
