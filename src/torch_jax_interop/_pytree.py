"""Pytrees without torch or JAX: one leaf-order policy for both sides, JAX's.

# Note [One pytree policy]

Values the JAX side sees go through JAX's own registry, and everything that flattens a
pytree on the torch side (``WrappedJaxFunction``'s parameters and arguments, the wire
codec, ``torch_to_jax``) uses *this* module, which follows the same policy so that both
sides agree on the leaf order:

* dicts (and ``defaultdict``) give their leaves in sorted key order, as ``jax.tree_util``
  does; an ``OrderedDict`` keeps its insertion order (as in JAX). A rebuilt dict keeps the
  insertion order the user wrote. Keys that cannot be sorted (mixed types) keep insertion
  order: JAX refuses such dicts, the conversions here accept them.
* tuples, lists, namedtuples and ``None`` (a node without children), as in JAX;
* any node type registered with ``jax.tree_util`` (Flax ``struct.dataclass``, Equinox
  modules, ``register_pytree_node`` classes), flattened by JAX's registry. Such a type can
  only exist once JAX is imported, so this module asks the registry only when ``jax`` is
  already in ``sys.modules`` (it never imports JAX itself);
* beyond JAX: plain (unregistered) dataclasses are nodes of their fields, rebuilt as the
  same class without a deep copy; subclasses of tuple/list/dict keep their items.

Everything else is a leaf.

A ``TreeSpec`` never holds a leaf: specs key compilation caches, and a spec that kept the
first call's tensors would keep them alive as long as the cache (the dataclass template
is a copy whose fields are cleared).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from typing import Any

LEAF = "leaf"
NONE = "none"
TUPLE = "tuple"
LIST = "list"
DICT = "dict"
NAMEDTUPLE = "namedtuple"
DATACLASS = "dataclass"
REGISTERED = "registered"  # a node type of JAX's pytree registry


@dataclasses.dataclass(frozen=True)
class TreeSpec:
    """The structure of a pytree, without its leaves. Hashable, so it can key a cache.

    ``meta`` holds what the node needs to be rebuilt: for a dict ``(keys in leaf order,
    dict type, default factory, insertion order)``; the namedtuple class; for a dataclass
    ``(class, field names, template)``; for a registered node ``(JAX treedef of the node,
    child names)``.
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
        return cached

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

    def child_names(self) -> tuple[Any, ...]:
        """One name per child: dict keys, field names, indices (``state_dict`` keys)."""
        kind = self.kind
        if kind == DICT:
            return tuple(self.meta[0])
        if kind in (DATACLASS, REGISTERED):  # field names / JAX key names
            return tuple(self.meta[1])
        return tuple(range(len(self.children)))

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
            keys, dict_type, default_factory, order = self.meta
            items = dict(zip(keys, children, strict=True))
            if order is not None:
                items = {key: items[key] for key in order}
            if dict_type is defaultdict:
                out: dict[Any, Any] = defaultdict(default_factory)
                out.update(items)
                return out
            return items if dict_type is dict else dict_type(items)
        if kind == NAMEDTUPLE:
            return self.meta._make(children)
        if kind == DATACLASS:
            _cls, names, template = self.meta
            obj = copy.copy(template)
            for name, value in zip(names, children, strict=True):
                object.__setattr__(obj, name, value)
            return obj
        if kind == REGISTERED:
            return self.meta[0].unflatten(children)
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
        if self.kind == REGISTERED:
            return f"{self.meta[0]}"
        name = self.meta.__name__ if self.kind == NAMEDTUPLE else self.meta[0].__name__
        return f"{name}({inner})"


LEAF_SPEC = TreeSpec(LEAF)
NONE_SPEC = TreeSpec(NONE, num_leaves=0)


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def _is_dataclass_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


# Types that JAX's registry does not know (leaves, or our own node rules), cached: asking
# the registry costs about a microsecond per leaf. Registered types are never cached as
# unknown (a type is registered when its class is defined, before any instance exists).
_UNREGISTERED: set[type] = set()


def _jax_registry() -> Any:
    """JAX's default pytree registry if JAX is loaded (see the Note); never imports it."""
    tree_util = sys.modules.get("jax.tree_util")
    return None if tree_util is None else tree_util.default_registry


def flatten(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> tuple[list[Any], TreeSpec]:
    """Flatten ``tree`` into its leaves (depth first, JAX's order) and a ``TreeSpec``."""
    leaves: list[Any] = []
    spec = _flatten(tree, leaves, is_leaf)
    return leaves, spec


def _dict_keys(tree: dict) -> tuple[tuple[Any, ...], tuple[Any, ...] | None]:
    """(keys in leaf order, insertion order or None where it is the same)."""
    keys = tuple(tree)
    if type(tree) is OrderedDict:
        return keys, None
    try:
        ordered = tuple(sorted(keys))
    except TypeError:  # mixed key types: insertion order (see the Note)
        return keys, None
    return ordered, (None if ordered == keys else keys)


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
    if cls is dict or cls is OrderedDict or cls is defaultdict:
        return _flatten_dict(tree, leaves, is_leaf)
    if _is_namedtuple(tree):
        children = tuple(_flatten(x, leaves, is_leaf) for x in tree)
        return TreeSpec(NAMEDTUPLE, children, cls, _count(children))
    if cls not in _UNREGISTERED:
        registry = _jax_registry()
        flat = None if registry is None else registry.flatten_one_level_with_keys(tree)
        if flat is not None:
            return _flatten_registered(tree, flat[0], leaves, is_leaf)
        if registry is not None:
            _UNREGISTERED.add(cls)
    if _is_dataclass_instance(tree):
        names = tuple(f.name for f in dataclasses.fields(tree))
        children = tuple(_flatten(getattr(tree, n), leaves, is_leaf) for n in names)
        template = copy.copy(tree)
        for name in names:  # never keep the leaves alive through the spec
            object.__setattr__(template, name, None)
        return TreeSpec(DATACLASS, children, _DataclassMeta(cls, names, template),
                        _count(children))
    if isinstance(tree, dict):
        return _flatten_dict(tree, leaves, is_leaf)
    if isinstance(tree, (tuple, list)):
        # A subclass of tuple/list that is not a namedtuple: keep its items, lose the class.
        children = tuple(_flatten(x, leaves, is_leaf) for x in tree)
        kind = TUPLE if isinstance(tree, tuple) else LIST
        return TreeSpec(kind, children, None, _count(children))
    leaves.append(tree)
    return LEAF_SPEC


def _flatten_dict(tree: dict, leaves: list[Any], is_leaf: Any) -> TreeSpec:
    keys, order = _dict_keys(tree)
    children = tuple(_flatten(tree[k], leaves, is_leaf) for k in keys)
    factory = tree.default_factory if isinstance(tree, defaultdict) else None
    return TreeSpec(DICT, children, (keys, type(tree), factory, order), _count(children))


def _flatten_registered(tree: Any, keyed: list[tuple[Any, Any]], leaves: list[Any],
                        is_leaf: Any) -> TreeSpec:
    tree_util = sys.modules["jax.tree_util"]
    node = tree_util.tree_structure(tree, is_leaf=lambda x: x is not tree)
    names = tuple(_key_name(key) for key, _ in keyed)
    children = tuple(_flatten(child, leaves, is_leaf) for _, child in keyed)
    return TreeSpec(REGISTERED, children, (node, names), _count(children))


def _key_name(key: Any) -> Any:
    """``GetAttrKey(name='w')`` -> ``"w"``, ``DictKey(key=k)`` -> ``k``, ... (JAX key paths)."""
    for attribute in ("name", "key", "idx"):
        if hasattr(key, attribute):
            return getattr(key, attribute)
    return str(key)


class _DataclassMeta(tuple):
    """(class, field names, template instance); equal when class and field names are.

    The template (fields cleared) is only used to copy non-field state when rebuilding; it
    must not make two specs of the same dataclass unequal (that would defeat caches keyed
    by ``TreeSpec``).
    """

    def __new__(cls, klass: type, names: tuple[str, ...], template: Any) -> _DataclassMeta:
        return super().__new__(cls, (klass, names, template))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, tuple) and tuple(self[:2]) == tuple(other[:2])

    def __hash__(self) -> int:
        return hash((self[0], self[1]))


def _count(children: tuple[TreeSpec, ...]) -> int:
    return sum(c.num_leaves for c in children)


def is_array_leaf(leaf: Any) -> bool:
    """Whether a leaf of parameters holds values: an array of any framework (anything with
    ``__dlpack__`` or ``__array__``) or a number. Other leaves (an Equinox module's
    activation function, a string) are constants of the tree."""
    return (isinstance(leaf, (int, float, complex)) or hasattr(leaf, "__dlpack__")
            or hasattr(leaf, "__array__"))


def tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    """Apply ``fn`` to every leaf of ``tree``; containers are rebuilt with the same types."""
    leaves, spec = flatten(tree)
    return spec.unflatten([fn(leaf) for leaf in leaves])


class TreeTemplate:
    """A tree whose *slot* leaves (tensors, arrays) are filled per call and whose other
    leaves are constants (a function inside an Equinox module, a static argument).

    Hashable by its structure and constants, so it keys a compilation cache; it holds no
    slot value (see the Note). ``fill(values)`` rebuilds the tree (values may be JAX tracers).
    """

    __slots__ = ("_hash", "constants", "leaves", "slots", "spec")

    def __init__(self, spec: TreeSpec, leaves: list[Any], slots: tuple[int, ...],
                 constants: tuple[tuple[int, Any], ...]) -> None:
        self.spec = spec
        self.leaves = leaves  # constants in place, None at the slots
        self.slots = slots
        self.constants = constants
        self._hash: int | None = None

    @classmethod
    def of(cls, tree: Any, is_slot: Callable[[Any], bool],
           is_leaf: Callable[[Any], bool] | None = None) -> tuple[TreeTemplate, list[Any]]:
        """The template of ``tree`` and its slot values, in leaf order."""
        leaves, spec = flatten(tree, is_leaf)
        slots: list[int] = []
        constants = []
        for i, leaf in enumerate(leaves):
            if is_slot(leaf):
                slots.append(i)
            else:
                constants.append((i, leaf))
        values = [leaves[i] for i in slots]
        for i in slots:
            leaves[i] = None
        return cls(spec, leaves, tuple(slots), tuple(constants)), values

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    def fill(self, values: Iterable[Any]) -> Any:
        leaves = list(self.leaves)
        for position, value in zip(self.slots, values, strict=True):
            leaves[position] = value
        return self.spec.unflatten(leaves)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash((self.spec, self.constants))
        return self._hash

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, TreeTemplate) and self.spec == other.spec
                and self.constants == other.constants)

