"""A small name -> object registry whose errors list the valid names.

detectron2/fvcore have the same idea, but their KeyError does not say what the
valid choices are; users of a CLI need that in one line.
"""
from __future__ import annotations

import difflib
from typing import Callable, Dict, Iterator, Optional, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name that is not registered. Its message is one line."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry:
    """Map names to objects.

    >>> MODELS = Registry("model")
    >>> @MODELS.register()
    ... def resnet8(num_classes=100): ...
    >>> MODELS.get("resnet8")
    """

    def __init__(self, kind: str, case_sensitive: bool = True):
        self.kind = kind
        self.case_sensitive = case_sensitive
        self._obj: Dict[str, object] = {}

    def _key(self, name: str) -> str:
        return name if self.case_sensitive else name.upper()

    def register(self, name: Optional[str] = None, obj: Optional[T] = None):
        """Use as ``@reg.register()``, ``@reg.register("NAME")`` or ``reg.register("NAME", obj)``."""

        def deco(o: T) -> T:
            key = self._key(name or o.__name__)
            if key in self._obj and self._obj[key] is not o:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._obj[key] = o
            return o

        return deco(obj) if obj is not None else deco

    def get(self, name: str):
        key = self._key(str(name))
        if key not in self._obj:
            raise UnknownNameError(self.unknown_message(name))
        return self._obj[key]

    def unknown_message(self, name: str) -> str:
        names = sorted(self._obj)
        close = difflib.get_close_matches(self._key(str(name)), names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Valid choices: {', '.join(names)}"

    def __contains__(self, name: str) -> bool:
        return self._key(str(name)) in self._obj

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._obj))

    def __len__(self) -> int:
        return len(self._obj)

    def names(self):
        return sorted(self._obj)


def import_submodules(package_name: str, package_path) -> None:
    """Import every module of a package so that its ``@register`` calls run.

    Adding a model family or a method is then one new file, with no list to edit.
    """
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(package_path), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package_name}.{info.name}")
