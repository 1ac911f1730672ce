"""How a submission's body is read: a deadline for slow senders, and upload slots shared between tenants.

A client that declares a large body and then trickles it must not hold the API's resources: every
body has a deadline (:class:`BodyPace`, in the manner of Apache's ``mod_reqtimeout``: an initial
allowance, extended as bytes arrive at a minimum rate, and a total cap), past which the request
gets 408 ``request_timeout`` and its connection is closed. Large bodies also take an upload slot
(:class:`UploadSlots`, which bounds the API's memory), but only once their bytes arrive, and one
tenant can never hold every slot.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from api.errors import ApiError
from broker.schema import ErrorCode

# bodies at least this big (declared, or once this much arrived) take an upload slot
LARGE_BODY_BYTES = 1024 * 1024


def request_timeout(what: str = "the request body") -> ApiError:
    """408 request_timeout, closing the connection (the rest of the body is never read)."""
    return ApiError(408, ErrorCode.REQUEST_TIMEOUT, f"{what} did not arrive in time; send it faster or retry",
                    headers={"Connection": "close"})


@dataclass
class BodyPace:
    """When a body must have arrived: ``initial_s`` after reading began, plus one second per
    ``min_bytes_per_s`` bytes received, and never later than ``max_s`` after the request began.

    Time spent waiting for an upload slot is not the sender's: it moves the rate deadline, not the
    total one.
    """

    initial_s: float
    min_bytes_per_s: float
    max_s: float
    started: float = field(default_factory=time.monotonic)  # monotonic
    waited_s: float = 0.0

    def remaining_s(self, received: int) -> float:
        """Seconds left for the next bytes of a body of which ``received`` bytes arrived (≤ 0: too late)."""
        by_rate = self.started + self.waited_s + self.initial_s + received / self.min_bytes_per_s
        return min(by_rate, self.started + self.max_s) - time.monotonic()

    def total_remaining_s(self) -> float:
        return self.started + self.max_s - time.monotonic()


class UploadSlots:
    """At most ``limit`` large submissions taken in at once per process, at most ``per_tenant`` of them
    from one tenant (so a tenant that fills its share, slow senders included, leaves the rest to others).

    A 1024² upload costs its body, the image string and its decoded bytes while it is read and
    validated: unbounded, 16 concurrent uploads took an API process from 100 MB to 290 MB. The work
    is CPU-bound, so waiting for a slot costs no throughput. Waiters are served in arrival order
    among those whose tenant is under its share.
    """

    def __init__(self, limit: int, per_tenant: int) -> None:
        self.limit = limit
        self.per_tenant = max(1, min(per_tenant, limit))
        self._held: dict[str, int] = {}
        self._in_use = 0
        self._waiters: deque[tuple[str, asyncio.Future[None]]] = deque()

    def held(self, tenant: str | None = None) -> int:
        """Slots held now, by ``tenant`` or by everyone."""
        return self._in_use if tenant is None else self._held.get(tenant, 0)

    def _fits(self, tenant: str) -> bool:
        return self._in_use < self.limit and self._held.get(tenant, 0) < self.per_tenant

    def _take(self, tenant: str) -> None:
        self._in_use += 1
        self._held[tenant] = self._held.get(tenant, 0) + 1

    async def acquire(self, tenant: str) -> None:
        """Wait for a slot (cancellable: a waiter that is cancelled holds nothing)."""
        if self._fits(tenant):
            self._take(tenant)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((tenant, waiter))
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # granted as it was cancelled: give it back
                self.release(tenant)
            else:
                self._waiters.remove((tenant, waiter))
            raise

    def release(self, tenant: str) -> None:
        self._in_use -= 1
        left = self._held[tenant] - 1
        if left:
            self._held[tenant] = left
        else:
            del self._held[tenant]
        for waiting in list(self._waiters):
            who, waiter = waiting
            # a waiter cancelled (its body timed out) whose task has not yet run its cleanup: its
            # future is done already and granting it would raise; its task removes it
            if waiter.done():
                continue
            if self._fits(who):
                self._waiters.remove(waiting)
                self._take(who)
                waiter.set_result(None)


class UploadTicket:
    """One request's claim on an upload slot: taken by :meth:`take` when its body proves large,
    given back by :meth:`give_back` when its intake ends (either may happen without the other)."""

    def __init__(self, slots: UploadSlots, tenant: str) -> None:
        self.slots, self.tenant, self.holding = slots, tenant, False

    async def take(self) -> None:
        if not self.holding:
            await self.slots.acquire(self.tenant)
            self.holding = True

    def give_back(self) -> None:
        if self.holding:
            self.holding = False
            self.slots.release(self.tenant)
