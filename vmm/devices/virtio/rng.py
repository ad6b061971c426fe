"""virtio-rng, the entropy device (virtio 1.2 section 5.4).

The driver offers device-writable buffers on the single request queue; the
device fills each with random bytes from an entropy source and returns it
(5.4.6). The device may write fewer bytes than the buffer holds, so each
request is capped at MAX_REQUEST_BYTES: a guest offering a huge buffer cannot
make the monitor allocate that much at once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Final

from vmm.devices.virtio.device import VIRTIO_RING_F_EVENT_IDX, VirtioDevice, feature_bit
from vmm.devices.virtio.queue import DescriptorChain, Queue
from vmm.memory import GuestMemory
from vmm.rate_limiter import RateLimiter

logger = logging.getLogger(__name__)

# 5.4.1 Device ID.
VIRTIO_ID_ENTROPY: Final = 4
# 5.4.2 Virtqueues: requestq only. 256 entries, the size the block device offers too.
RNG_QUEUE_SIZE: Final = 256
REQUEST_QUEUE_INDEX: Final = 0
# Largest number of random bytes served per request (see the module docstring).
MAX_REQUEST_BYTES: Final = 64 * 1024

EntropySource = Callable[[int], bytes]


@dataclass
class EntropyMetrics:
    """Counters for the metrics endpoint's "entropy" group."""

    entropy_event_count: int = 0
    entropy_bytes: int = 0
    host_rng_fails: int = 0
    invalid_requests: int = 0
    entropy_rate_limiter_throttled: int = 0
    rate_limiter_event_count: int = 0


class Rng(VirtioDevice):
    """An entropy device that serves requests from `source`, optionally rate limited.

    `source(n)` returns n random bytes or raises OSError. A request the rate
    limiter blocks stays with the device and is served first when
    `on_rate_limiter_timer` reports that the limiter unblocked.
    """

    device_type = VIRTIO_ID_ENTROPY
    queue_max_sizes = (RNG_QUEUE_SIZE,)

    def __init__(
        self, source: EntropySource = os.urandom, rate_limiter: RateLimiter | None = None
    ) -> None:
        super().__init__()
        self.source = source
        self.rate_limiter = rate_limiter
        self.metrics = EntropyMetrics()
        self.avail_features |= feature_bit(VIRTIO_RING_F_EVENT_IDX)
        self._deferred: DescriptorChain | None = None

    def __repr__(self) -> str:
        return f"Rng(rate_limiter={self.rate_limiter!r})"

    def process_queue(self, index: int) -> None:
        """Serve every available request until the queue is empty or the limiter blocks."""
        with self.lock:
            queue = self.queues[index]
            served = False
            while (chain := self._next_chain(queue)) is not None:
                length = self._request_length(chain)
                if not self._admit(length):
                    self._deferred = chain
                    break
                queue.add_used(chain.head_index, self._serve(chain, length))
                served = True
            if served:
                self.signal_used_queue(queue)

    def _next_chain(self, queue: Queue) -> DescriptorChain | None:
        if self._deferred is not None:
            chain, self._deferred = self._deferred, None
            return chain
        return queue.pop()

    @staticmethod
    def _request_length(chain: DescriptorChain) -> int:
        return min(MAX_REQUEST_BYTES, sum(d.length for d in chain.writable))

    def _admit(self, length: int) -> bool:
        """Take one op and `length` bytes from the rate limiter, or nothing."""
        limiter = self.rate_limiter
        if limiter is None:
            return True
        if not limiter.consume_request(length):
            self.metrics.entropy_rate_limiter_throttled += 1
            return False
        return True

    def _serve(self, chain: DescriptorChain, length: int) -> int:
        """Fill the chain's writable buffers with up to `length` random bytes; return the count."""
        self.metrics.entropy_event_count += 1
        if length == 0:
            self.metrics.invalid_requests += 1
            return 0
        try:
            data = self.source(length)
        except OSError as error:
            self.metrics.host_rng_fails += 1
            fails = self.metrics.host_rng_fails
            # Log the 1st, 2nd, 4th, 8th... failure: the guest decides how often it asks.
            if fails & (fails - 1) == 0:
                logger.warning(
                    "%r: entropy source failed (%d failures so far): %s", self, fails, error
                )
            return 0
        written = _scatter(self._memory(), chain, data)
        self.metrics.entropy_bytes += written
        return written

    def _memory(self) -> GuestMemory:
        if self.memory is None:
            raise RuntimeError(f"{self!r} processes a queue before activation")
        return self.memory

    def on_rate_limiter_timer(self) -> bool:
        """Acknowledge the limiter's timerfd; return True when the queue should be processed."""
        with self.lock:
            if self.rate_limiter is None or not self.rate_limiter.on_timer():
                return False
            self.metrics.rate_limiter_event_count += 1
            return self.is_activated

    def reset(self) -> None:
        with self.lock:
            self._deferred = None
            super().reset()


def _scatter(memory: GuestMemory, chain: DescriptorChain, data: bytes) -> int:
    """Write `data` across the chain's device-writable buffers in order; return bytes written."""
    offset = 0
    for descriptor in chain.writable:
        if offset >= len(data):
            break
        part = data[offset : offset + descriptor.length]
        memory.write(descriptor.address, part)
        offset += len(part)
    return offset
