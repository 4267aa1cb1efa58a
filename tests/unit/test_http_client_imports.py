"""httpcore, under the webhook dispatcher, asks which async library runs on every lock it makes
(several per request); without sniffio installed, each ask is a failed import that searches
sys.path again (Python does not cache failed imports)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType

from httpcore import _synchronization


class ImportWatcher(importlib.abc.MetaPathFinder):
    """Records every module name the import system has to search for."""

    def __init__(self) -> None:
        self.searched: list[str] = []

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        self.searched.append(fullname)
        return None


async def test_httpcore_async_library_check_does_not_search_for_a_module_each_time() -> None:
    """After the first check, asking again imports nothing: sniffio is installed and cached."""
    assert _synchronization.current_async_library() == "asyncio"
    watcher = ImportWatcher()
    sys.meta_path.insert(0, watcher)
    try:
        for _ in range(10):
            assert _synchronization.current_async_library() == "asyncio"
    finally:
        sys.meta_path.remove(watcher)
    assert watcher.searched == []
