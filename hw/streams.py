"""Clocks and signals between the compute stream and the copy stream, the same on CUDA and on CPU.

On CUDA the two streams are `torch.cuda.Stream`s driven from two host threads: a thread signals the
other through a condition variable, and the device orders the streams through CUDA events. On CPU
the "streams" are the two threads themselves, and the condition variable is the whole signal.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

EVENT_WINDOW = 1024  # CUDA events kept per stream (waits look back depth + 1 or `layers` layer-steps)


class Clock:
    """Timestamps on the compute stream: CUDA events on CUDA, perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        """A timestamp at this point of the compute stream."""
        if self.cuda:
            import torch  # lazy: `import tiersim.hw` stays torch-free

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        """Seconds from mark a to mark b (call after synchronising)."""
        return a.elapsed_time(b) * 1e-3 if self.cuda else b - a

    def sync(self) -> None:
        """Wait until the device is done."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()


class Progress:
    """Layer-steps finished by one stream, visible to the other thread (and, on CUDA, to the other stream)."""

    def __init__(self, cuda: bool):
        self.cuda, self.count, self.failed = cuda, 0, None
        self.events: dict[int, object] = {}
        self.cond = threading.Condition()

    def advance(self, stream=None) -> None:
        """One more layer-step done (on CUDA: enqueued on `stream`; an event marks its completion)."""
        event = None
        if self.cuda:
            import torch

            event = torch.cuda.Event()
            event.record(stream)
        with self.cond:
            self.events[self.count] = event
            self.events.pop(self.count - EVENT_WINDOW, None)
            self.count += 1
            self.cond.notify_all()

    def wait(self, count: int, stream=None) -> None:
        """Block until `count` layer-steps are done (CUDA: enqueued, and `stream` waits for them on the device)."""
        if count <= 0:
            return
        with self.cond:
            self.cond.wait_for(lambda: self.count >= count or self.failed is not None)
            if self.failed is not None:
                raise RuntimeError("the other stream failed") from self.failed
            event = self.events.get(count - 1)
        if self.cuda:
            if event is None:
                raise RuntimeError(f"layer-step {count - 1} is older than the {EVENT_WINDOW} kept events")
            stream.wait_event(event)

    def fail(self, error: BaseException) -> None:
        """Wake every waiter with an error."""
        with self.cond:
            self.failed = error
            self.cond.notify_all()


@contextlib.contextmanager
def cpu_threads(n: int = 1) -> Iterator[None]:
    """Torch intra-op threads for the CPU device inside the block (one: the other core is the copy engine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def on_stream(stream):
    """Context: enqueue on the CUDA `stream` inside the block; nothing to switch on CPU (stream None)."""
    if stream is None:
        return contextlib.nullcontext()
    import torch

    return torch.cuda.stream(stream)
