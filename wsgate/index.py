"""The subscription index: which subscribers hold a subscription matching an event topic.

A trie keyed by topic segments. Matching walks the event topic's segments
(following the exact child and the ``*`` child at each level) and collects the
subscribers stored at every node it passes, so the cost of a lookup depends on
the topic's length and the wildcards present, never on how many subscriptions
exist.

At a million subscriptions nearly every object a lookup touches is out of the
CPU caches, so the layout keeps the objects per level few (docs/performance.md,
"Index pass"):

- an inner node *is* its children dict (a ``dict`` subclass whose two slots
  hold the ``*`` child and the subscribers ending there), so one object holds
  the node and the table of its children;
- a topic with no longer subscriptions below it has no node at all: its
  parent's slot holds its subscribers directly (a leaf);
- subscribers are kept as the subscriber itself while there is one, and as a
  ``set`` from the second on.

So a slot (a children dict value, ``star``, ``subs``) holds ``None`` (nothing;
never in a dict), a ``_Node``, a ``set`` of two or more subscribers, or one
subscriber. Subscribers are hashable, so one is never a ``dict`` or a ``set``:
``type(x) is _Node`` and ``type(x) is set`` tell the cases apart.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from sys import intern
from typing import Any, Generic, TypeVar

from wsgate.topics import WILDCARD

S = TypeVar("S", bound=Hashable)

_EMPTY: frozenset = frozenset()


class _Node(dict[str, Any]):
    # dict values and ``star`` are slots as described in the module docstring;
    # ``subs`` is the subscribers whose topic ends here (None, one, or a set).
    # Every node but the root has a child or a star child: one that loses its
    # last one is replaced by its subscribers (or removed).
    __slots__ = ("star", "subs")

    def __init__(self, subs: Any = None) -> None:
        self.star: Any = None
        self.subs: Any = subs


def _with(subs: Any, subscriber: Any) -> Any:
    """The subscribers ``subs`` with ``subscriber`` added, or None when it was already there."""
    if subs is None:
        return subscriber
    if type(subs) is set:
        if subscriber in subs:
            return None
        subs.add(subscriber)
        return subs
    if subs is subscriber or subs == subscriber:
        return None
    return {subs, subscriber}


def _without(subs: Any, subscriber: Any) -> tuple[bool, Any]:
    """(whether ``subscriber`` was in ``subs``, the subscribers left: None, one, or a set)."""
    if subs is None:
        return False, None
    if type(subs) is set:
        if subscriber not in subs:
            return False, subs
        subs.discard(subscriber)
        if len(subs) == 1:
            return True, next(iter(subs))
        return True, subs
    if subs is subscriber or subs == subscriber:
        return True, None
    return False, subs


def _put(parent: _Node, seg: str, value: Any) -> None:
    """Store ``value`` in parent's slot for ``seg``; None empties the slot."""
    if seg == WILDCARD:
        parent.star = value
    elif value is None:
        del parent[seg]
    elif seg in parent:
        parent[seg] = value
    else:
        # A lookup compares the event's fresh segment with the stored key, so
        # the key is read on every match: interned, the keys that repeat
        # across topics ("call", a call id under both "call" and "*") are one
        # string, which the cache keeps, rather than one per subscription.
        parent[intern(seg) if type(seg) is str else seg] = value


class SubscriptionIndex(Generic[S]):
    """Maps subscription topics (segment tuples) to their subscribers.

    A subscriber is any hashable object but None (the gateway stores
    connections). A subscriber holds a given topic at most once; adding it
    twice is a no-op.
    """

    __slots__ = ("_root", "_count")

    def __init__(self) -> None:
        self._root = _Node()
        self._count = 0

    def __len__(self) -> int:
        """The number of (topic, subscriber) pairs held."""
        return self._count

    def add(self, segments: tuple[str, ...], subscriber: S) -> bool:
        """Add subscriber under the topic. Returns False when it was already there.

        Raises ValueError for a None subscriber (None marks an empty slot).
        """
        if subscriber is None:
            raise ValueError("a subscriber cannot be None")
        node = self._root
        last = len(segments) - 1
        for depth, seg in enumerate(segments):
            child = node.star if seg == WILDCARD else node.get(seg)
            if depth == last:
                if type(child) is _Node:
                    subs = _with(child.subs, subscriber)
                    if subs is None:
                        return False
                    child.subs = subs
                else:
                    subs = _with(child, subscriber)
                    if subs is None:
                        return False
                    _put(node, seg, subs)
                break
            if type(child) is not _Node:
                # A leaf (or nothing) gains a longer subscription below it.
                child = _Node(child)
                _put(node, seg, child)
            node = child
        else:  # the empty topic: kept at the root, as it always was, and never matched
            subs = _with(node.subs, subscriber)
            if subs is None:
                return False
            node.subs = subs
        self._count += 1
        return True

    def remove(self, segments: tuple[str, ...], subscriber: S) -> bool:
        """Remove subscriber from the topic, pruning empty nodes. False if it was absent."""
        path: list[tuple[_Node, str]] = []
        node = self._root
        for seg in segments[:-1]:
            child = node.star if seg == WILDCARD else node.get(seg)
            if type(child) is not _Node:
                return False
            path.append((node, seg))
            node = child
        if not segments:
            found, node.subs = _without(node.subs, subscriber)
        else:
            seg = segments[-1]
            child = node.star if seg == WILDCARD else node.get(seg)
            if type(child) is _Node:
                found, child.subs = _without(child.subs, subscriber)
            else:
                found, left = _without(child, subscriber)
                if found:
                    _put(node, seg, left)
        if not found:
            return False
        self._count -= 1
        # Prune so memory follows the live subscriptions, not the history of
        # them: a node left without children becomes its subscribers (a leaf),
        # or goes when it has none, which may leave its parent without children.
        while path and not node and node.star is None:
            parent, seg = path.pop()
            _put(parent, seg, node.subs)
            node = parent
        return True

    def match(self, event: tuple[str, ...]) -> Iterable[S]:
        """Every subscriber whose subscription matches the event topic, each once.

        The event topic is concrete (no ``*``). The result may be an internal
        set: iterate it before the index changes, and do not modify it.
        """
        found: list[Any] = []  # sets of subscribers, or single subscribers
        frontier = [self._root]
        last = len(event) - 1
        for depth, seg in enumerate(event):
            following: list[_Node] = []
            deeper = depth < last
            for node in frontier:
                child = node.get(seg)
                if child is not None:
                    if type(child) is _Node:
                        if child.subs is not None:
                            found.append(child.subs)
                        if deeper:
                            following.append(child)
                    else:
                        found.append(child)
                child = node.star
                if child is not None:
                    if type(child) is _Node:
                        if child.subs is not None:
                            found.append(child.subs)
                        if deeper:
                            following.append(child)
                    else:
                        found.append(child)
            if not following:
                break
            frontier = following
        if not found:
            return _EMPTY
        if len(found) == 1:
            only = found[0]
            return only if type(only) is set else (only,)
        result: set[S] = set()
        for subs in found:
            if type(subs) is set:
                result.update(subs)
            else:
                result.add(subs)
        return result
