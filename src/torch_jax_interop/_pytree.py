"""Pytrees without torch or JAX: the containers both sides agree on.

Containers are tuples (namedtuples included), lists, dicts (any hashable keys, insertion
order kept, ``OrderedDict`` / ``defaultdict`` kept), dataclass instances and ``None``.
Everything else is a leaf. Unlike ``jax.tree_util`` this never sorts dict keys (so keys of
mixed types work and the order a user wrote is kept) and it rebuilds dataclasses as the
same class without deep-copying them.

The client and the worker use this module (the worker must not import torch, the client
must not import JAX), and the wire format's structure description is a ``TreeSpec``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

LEAF = "leaf"
NONE = "none"
TUPLE = "tuple"
LIST = "list"
DICT = "dict"
NAMEDTUPLE = "namedtuple"
DATACLASS = "dataclass"


@dataclasses.dataclass(frozen=True)
class TreeSpec:
    """The structure of a pytree, without its leaves. Hashable, so it can key a cache.

    ``meta`` holds what the node needs to be rebuilt: dict keys and type, the namedtuple or
    dataclass class (with the dataclass's field names and an example instance to copy).
    """

    kind: str
    children: tuple[TreeSpec, ...] = ()
    meta: Any = None
    num_leaves: int = 1

    def __hash__(self) -> int:
        # computed once: specs key the compilation caches and are hashed on every call
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.kind, self.children, self.meta, self.num_leaves))
            object.__setattr__(self, "_hash", cached)
        return cached  # type: ignore[no-any-return]

    def __getstate__(self) -> dict[str, Any]:
        # string hashes differ between processes: never carry the cached one along
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    def unflatten(self, leaves: Iterable[Any]) -> Any:
        """Rebuild the tree from ``leaves`` (in the order ``flatten`` gave them)."""
        iterator = iter(leaves)
        tree = self._build(iterator)
        sentinel = object()
        if next(iterator, sentinel) is not sentinel:
            raise ValueError(f"too many leaves for a tree with {self.num_leaves} leaves")
        return tree

    def _build(self, leaves: Any) -> Any:
        kind = self.kind
        if kind == LEAF:
            try:
                return next(leaves)
            except StopIteration:
                raise ValueError("too few leaves to rebuild the tree") from None
        if kind == NONE:
            return None
        children = [child._build(leaves) for child in self.children]
        if kind == TUPLE:
            return tuple(children)
        if kind == LIST:
            return children
        if kind == DICT:
            keys, dict_type, default_factory = self.meta
            if dict_type is defaultdict:
                out: dict[Any, Any] = defaultdict(default_factory)
                out.update(zip(keys, children, strict=True))
                return out
            return dict_type(zip(keys, children, strict=True))
        if kind == NAMEDTUPLE:
            return self.meta._make(children)
        if kind == DATACLASS:
            _cls, names, template = self.meta
            obj = copy.copy(template)
            for name, value in zip(names, children, strict=True):
                object.__setattr__(obj, name, value)
            return obj
        raise ValueError(f"unknown tree node kind `{kind}`")

    def __repr__(self) -> str:
        if self.kind == LEAF:
            return "*"
        if self.kind == NONE:
            return "None"
        inner = ", ".join(map(repr, self.children))
        if self.kind == TUPLE:
            return f"({inner}{',' if len(self.children) == 1 else ''})"
        if self.kind == LIST:
            return f"[{inner}]"
        if self.kind == DICT:
            items = zip(self.meta[0], self.children, strict=True)
            return "{" + ", ".join(f"{k!r}: {c!r}" for k, c in items) + "}"
        name = self.meta.__name__ if self.kind == NAMEDTUPLE else self.meta[0].__name__
        return f"{name}({inner})"


LEAF_SPEC = TreeSpec(LEAF)
NONE_SPEC = TreeSpec(NONE, num_leaves=0)


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def _is_dataclass_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def flatten(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> tuple[list[Any], TreeSpec]:
    """Flatten ``tree`` into its leaves (depth first, container order) and a ``TreeSpec``."""
    leaves: list[Any] = []
    spec = _flatten(tree, leaves, is_leaf)
    return leaves, spec


def _flatten(tree: Any, leaves: list[Any], is_leaf: Callable[[Any], bool] | None) -> TreeSpec:
    if is_leaf is not None and is_leaf(tree):
        leaves.append(tree)
        return LEAF_SPEC
    cls = type(tree)
    if tree is None:
        return NONE_SPEC
    if cls is tuple or cls is list:
        children = tuple(_flatten(x, leaves, is_leaf) for x in tree)
        return TreeSpec(TUPLE if cls is tuple else LIST, children, None, _count(children))
    if isinstance(tree, dict):
        keys = tuple(tree.keys())
        children = tuple(_flatten(tree[k], leaves, is_leaf) for k in keys)
        factory = tree.default_factory if isinstance(tree, defaultdict) else None
        return TreeSpec(DICT, children, (keys, cls, factory), _count(children))
    if _is_namedtuple(tree):
        children = tuple(_flatten(x, leaves, is_leaf) for x in tree)
        return TreeSpec(NAMEDTUPLE, children, cls, _count(children))
    if _is_dataclass_instance(tree):
        names = tuple(f.name for f in dataclasses.fields(tree))
        children = tuple(_flatten(getattr(tree, n), leaves, is_leaf) for n in names)
        return TreeSpec(DATACLASS, children, _DataclassMeta(cls, names, tree), _count(children))
    if isinstance(tree, (tuple, list)):
        # A subclass of tuple/list that is not a namedtuple: keep its items, lose the class.
        children = tuple(_flatten(x, leaves, is_leaf) for x in tree)
        kind = TUPLE if isinstance(tree, tuple) else LIST
        return TreeSpec(kind, children, None, _count(children))
    leaves.append(tree)
    return LEAF_SPEC


class _DataclassMeta(tuple):  # type: ignore[type-arg]
    """(class, field names, template instance); equal when class and field names are.

    The template is only used to copy non-field state when rebuilding; it must not make two
    specs of the same dataclass unequal (that would defeat caches keyed by ``TreeSpec``).
    """

    def __new__(cls, klass: type, names: tuple[str, ...], template: Any) -> _DataclassMeta:
        return super().__new__(cls, (klass, names, template))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, tuple) and tuple(self[:2]) == tuple(other[:2])

    def __hash__(self) -> int:
        return hash((self[0], self[1]))


def _count(children: tuple[TreeSpec, ...]) -> int:
    return sum(c.num_leaves for c in children)


def tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    """Apply ``fn`` to every leaf of ``tree``; containers are rebuilt with the same types."""
    leaves, spec = flatten(tree)
    return spec.unflatten([fn(leaf) for leaf in leaves])
