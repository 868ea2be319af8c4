"""Execute the book's notebooks in parallel into the jupyter-cache that `jupyter-book build` then reads.

jupyter-book (execute_notebooks: cache) runs notebooks one after another; this runs the outdated ones
of _toc.yml side by side (one process per core) first, so the build only renders them. Each notebook
still executes once per change: unchanged notebooks are cache hits. A notebook that fails here is
left uncached; the build then runs it again and fails with its traceback (-W).

Usage: python .ci/execute_book.py CACHE_PATH TIMEOUT_SECONDS
"""

import sys
from pathlib import Path

import yaml
from jupyter_cache import get_cache
from jupyter_cache.executors import load_executor


def toc_notebooks(toc: Path) -> list[str]:
    """The .ipynb files that _toc.yml names (root, chapters and sections, any depth)."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            for key in ("root", "file"):
                if isinstance(node.get(key), str):
                    path = toc.parent / f"{node[key]}.ipynb"
                    if path.is_file():
                        found.append(str(path.resolve()))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load(toc.read_text()))
    return sorted(set(found))


def longest_first(notebooks: list[str]) -> list[str]:
    """The notebooks in the order to start them: the pool hands them out in project order, so the
    longest one (chapter 6, about 8 of the book's 18 CPU-minutes) starts first instead of last and
    the others fill the second core meanwhile. A notebook's size is a good enough proxy here."""
    return sorted(notebooks, key=lambda nb: -Path(nb).stat().st_size)


def main(cache_path: str, timeout: str) -> int:
    notebooks = toc_notebooks(Path("_toc.yml"))
    cache = get_cache(cache_path)
    for record in cache.list_project_records():
        if record.uri not in notebooks:
            cache.remove_nb_from_project(record.pk)
    for notebook in longest_first(notebooks):  # a new record's pk, hence its place in the pool, follows this order
        cache.add_nb_to_project(notebook)
    result = load_executor("local-parallel", cache).run_and_cache(timeout=int(timeout), filter_uris=notebooks)
    print(
        f"book notebooks: {len(notebooks)}; executed now: {len(result.succeeded)}; "
        f"failed: {len(result.excepted) + len(result.errored)} (the build reports them)"
    )
    print_execution_times(cache, notebooks, set(result.succeeded))
    return 0


def print_execution_times(cache, notebooks: list[str], executed_now: set[str]) -> None:
    """Each chapter's execution time (from its cache record), so the slow ones are seen in the build log."""
    print("execution time per notebook (seconds, on this machine; 'cached' = from an earlier run):")
    for notebook in sorted(notebooks):
        try:
            record = cache.get_cached_project_nb(notebook)
        except KeyError:  # not in the project (only when called on its own)
            record = None
        seconds = record.data.get("execution_seconds") if record is not None else None
        when = "now" if notebook in executed_now else "cached"
        shown = f"{seconds:7.1f}" if seconds is not None else "      -"
        print(f"  {shown}  {when:6}  {Path(notebook).relative_to(Path.cwd())}")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
