"""Who gets which events: every request has one owner, the consumer that added it (the
step API, one generate() call, one stream()), and each owner an inbox that keeps its
requests' events, in the order they were made, until the owner takes them. A request's
id stays taken until its owner has taken its final event."""
from collections import deque
from typing import Deque, Dict, Hashable, List

from .outputs import TokenEvent

STEP_API = "step-api"  # the owner of requests added through Engine.add_request


class Inbox:
    def __init__(self):
        self.owner: Dict[str, Hashable] = {}  # request id -> its consumer
        self.boxes: Dict[Hashable, Deque[TokenEvent]] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.owner

    def register(self, request_id: str, owner: Hashable) -> None:
        if request_id in self.owner:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        self.owner[request_id] = owner
        self.boxes.setdefault(owner, deque())

    def put(self, ev: TokenEvent) -> None:
        self.boxes[self.owner[ev.request_id]].append(ev)

    def take(self, owner: Hashable) -> List[TokenEvent]:
        """The events waiting for this consumer, oldest first (each is given out once)."""
        box = self.boxes.get(owner)
        if not box:
            return []
        events = list(box)
        box.clear()
        for ev in events:
            if ev.finish_reason is not None:
                self.owner.pop(ev.request_id, None)
        return events

    def drop(self, request_id: str) -> None:
        """Forget a request and its events not yet taken."""
        owner = self.owner.pop(request_id, None)
        box = self.boxes.get(owner)
        if box:
            kept = [ev for ev in box if ev.request_id != request_id]
            box.clear()
            box.extend(kept)

    def release(self, owner: Hashable) -> List[str]:
        """A generate() or stream() is done: drop its inbox and its requests' ids; -> those ids."""
        self.boxes.pop(owner, None)
        rids = [r for r, o in self.owner.items() if o == owner]
        for rid in rids:
            del self.owner[rid]
        return rids
