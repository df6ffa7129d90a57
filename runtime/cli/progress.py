"""The progress bar long commands (export, bench) draw on stderr while they work."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


@contextmanager
def stage_progress(name: str, width: int) -> Iterator[Callable[[str, float], None]]:
    """Yield `progress(stage, fraction_done)`. The bar is drawn only when stderr is a terminal (a pipe or a
    log gets no control codes) and is erased when the block ends."""
    console = Console(stderr=True)
    with Progress(
        TextColumn(f"{{task.description:<{width}.{width}}}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task(name, total=1.0)
        yield lambda stage, done: bar.update(task, description=stage, completed=done)
