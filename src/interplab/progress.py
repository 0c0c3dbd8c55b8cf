"""One progress bar for the whole package.

Library calls take ``progress: bool = False`` (scripts and tests stay quiet); the CLI passes
``True``. tqdm is imported only when a bar is shown.
"""

from __future__ import annotations

from typing import Iterable, TypeVar

T = TypeVar("T")


class _NoBar:
    """Stands in for a tqdm bar when progress is off."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress_bar(enabled: bool, *, total: int | None = None, desc: str = "", unit: str = "it",
                 initial: int = 0):
    """A tqdm bar to ``update()`` by hand, or a silent stand-in when `enabled` is False."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, mininterval=0.5)


def progress(items: Iterable[T], enabled: bool, *, desc: str = "", unit: str = "it",
             total: int | None = None) -> Iterable[T]:
    """`items`, wrapped in a bar when `enabled`."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, total=total, mininterval=0.5)
