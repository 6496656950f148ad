"""One registry per kind of plug-in (objectives, preference losses, advantage estimators,
reward functions, reasoning strategies, stages), all registered the same way:

    LOSSES = Registry("preference loss")

    @LOSSES.register("sigmoid")
    def sigmoid_loss(...): ...

`get` names the registered choices when a name is unknown, so a typo in a recipe says what to
write instead. Lookups by name keep the layers apart: a lower layer never imports the
module that registers a plug-in.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T | None = None) -> Callable[[T], T] | T:
        """`@REG.register("name")` above a function or class, or `REG.register("name", obj)`."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return add if item is None else add(item)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self._items)}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def items(self):
        return self._items.items()

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
