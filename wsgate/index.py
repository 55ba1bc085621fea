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
    __slots__ = ("children", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _Node[S]] = {}
        self.subscribers: set[S] = set()


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
            child = node.children.get(seg)
            if child is None:
                child = node.children[seg] = _Node()
            node = child
        if subscriber in node.subscribers:
            return False
        node.subscribers.add(subscriber)
        self._count += 1
        return True

    def remove(self, segments: tuple[str, ...], subscriber: S) -> bool:
        """Remove subscriber from the topic, pruning empty nodes. False if it was absent."""
        path: list[tuple[_Node[S], str]] = []
        node = self._root
        for seg in segments:
            child = node.children.get(seg)
            if child is None:
                return False
            path.append((node, seg))
            node = child
        if subscriber not in node.subscribers:
            return False
        node.subscribers.discard(subscriber)
        self._count -= 1
        # Prune so memory follows the live subscriptions, not the history of them.
        while path and not node.subscribers and not node.children:
            parent, seg = path.pop()
            del parent.children[seg]
            node = parent
        return True

    def match(self, event: tuple[str, ...]) -> Iterable[S]:
        """Every subscriber whose subscription matches the event topic, each once.

        The result may be an internal set: iterate it before the index changes,
        and do not modify it.
        """
        found: list[set[S]] = []
        frontier = [self._root]
        last = len(event) - 1
        for depth, seg in enumerate(event):
            following: list[_Node[S]] = []
            for node in frontier:
                child = node.children.get(seg)
                if child is not None:
                    if child.subscribers:
                        found.append(child.subscribers)
                    if depth < last and child.children:
                        following.append(child)
                star = node.children.get(WILDCARD)
                if star is not None:
                    if star.subscribers:
                        found.append(star.subscribers)
                    if depth < last and star.children:
                        following.append(star)
            if not following:
                break
            frontier = following
        if not found:
            return _EMPTY
        if len(found) == 1:
            return found[0]
        return set().union(*found)
