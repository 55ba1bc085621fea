"""The subscription index: which subscribers hold a subscription matching an event topic.

A trie keyed by topic segments. Matching walks the event topic's segments
(following the exact child and the ``*`` child at each level) and collects the
subscribers stored at every node it passes, so the cost of a lookup depends on
the topic's length and the wildcards present, never on how many subscriptions
exist.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

from wsgate.topics import WILDCARD

S = TypeVar("S", bound=Hashable)

_EMPTY: frozenset = frozenset()


class _Node(Generic[S]):
    # The ``*`` child has its own slot: a match then never probes a large
    # children dict a second time per level, which at a million subscriptions
    # is a cache miss as costly as the real lookup. Children and subscribers are
    # made on first use, so intermediate nodes stay small.
    __slots__ = ("children", "star", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _Node[S]] | None = None
        self.star: _Node[S] | None = None
        self.subscribers: set[S] | None = None

    def child(self, seg: str) -> _Node[S] | None:
        if seg == WILDCARD:
            return self.star
        return None if self.children is None else self.children.get(seg)

    def make_child(self, seg: str) -> _Node[S]:
        found = self.child(seg)
        if found is not None:
            return found
        node: _Node[S] = _Node()
        if seg == WILDCARD:
            self.star = node
        else:
            if self.children is None:
                self.children = {}
            self.children[seg] = node
        return node

    def drop_child(self, seg: str) -> None:
        if seg == WILDCARD:
            self.star = None
        elif self.children is not None:
            del self.children[seg]
            if not self.children:
                self.children = None

    def empty(self) -> bool:
        return not self.subscribers and self.children is None and self.star is None


class SubscriptionIndex(Generic[S]):
    """Maps subscription topics (segment tuples) to their subscribers.

    A subscriber is any hashable object (the gateway stores connections).
    A subscriber holds a given topic at most once; adding it twice is a no-op.
    """

    __slots__ = ("_root", "_count")

    def __init__(self) -> None:
        self._root: _Node[S] = _Node()
        self._count = 0

    def __len__(self) -> int:
        """The number of (topic, subscriber) pairs held."""
        return self._count

    def add(self, segments: tuple[str, ...], subscriber: S) -> bool:
        """Add subscriber under the topic. Returns False when it was already there."""
        node = self._root
        for seg in segments:
            node = node.make_child(seg)
        if node.subscribers is None:
            node.subscribers = set()
        elif subscriber in node.subscribers:
            return False
        node.subscribers.add(subscriber)
        self._count += 1
        return True

    def remove(self, segments: tuple[str, ...], subscriber: S) -> bool:
        """Remove subscriber from the topic, pruning empty nodes. False if it was absent."""
        path: list[tuple[_Node[S], str]] = []
        node = self._root
        for seg in segments:
            child = node.child(seg)
            if child is None:
                return False
            path.append((node, seg))
            node = child
        if not node.subscribers or subscriber not in node.subscribers:
            return False
        node.subscribers.discard(subscriber)
        if not node.subscribers:
            node.subscribers = None
        self._count -= 1
        # Prune so memory follows the live subscriptions, not the history of them.
        while path and node.empty():
            parent, seg = path.pop()
            parent.drop_child(seg)
            node = parent
        return True

    def match(self, event: tuple[str, ...]) -> Iterable[S]:
        """Every subscriber whose subscription matches the event topic, each once.

        The event topic is concrete (no ``*``). The result may be an internal
        set: iterate it before the index changes, and do not modify it.
        """
        found: list[set[S]] = []
        frontier = [self._root]
        last = len(event) - 1
        for depth, seg in enumerate(event):
            following: list[_Node[S]] = []
            deeper = depth < last
            for node in frontier:
                children = node.children
                if children is not None:
                    child = children.get(seg)
                    if child is not None:
                        if child.subscribers:
                            found.append(child.subscribers)
                        if deeper and (child.children is not None or child.star is not None):
                            following.append(child)
                star = node.star
                if star is not None:
                    if star.subscribers:
                        found.append(star.subscribers)
                    if deeper and (star.children is not None or star.star is not None):
                        following.append(star)
            if not following:
                break
            frontier = following
        if not found:
            return _EMPTY
        if len(found) == 1:
            return found[0]
        return set().union(*found)
