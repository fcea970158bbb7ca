"""docs/architecture.md names real files: every path it gives exists (a renamed or moved file fails here
until the page follows). Paths are relative to the repository or to the package or source folder they
sit in; a bare file name (listed after its folder's first file) is looked for anywhere in the sources."""
import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCHITECTURE = os.path.join(REPO, "docs", "architecture.md")
BASES = [REPO] + [os.path.join(REPO, d) for d in ("python/rtllm", "cpp/src", "cpp/include/rtllm")]


def named_paths(text: str) -> list:
    """Backticked words that are paths: with a slash or a source suffix, any `: name` after them cut."""
    words = (w.split(":")[0].split(" ")[0] for w in re.findall(r"`([^`]+)`", text))
    return [w for w in words if "/" in w or re.search(r"\.(py|cc|h|cu|cuh|md)$", w)]


def exists(path: str) -> bool:
    if "/" not in path:
        return bool(glob.glob(os.path.join(REPO, "**", path), recursive=True))
    return any(glob.glob(os.path.join(base, path)) for base in BASES)


def test_paths_exist():
    paths = named_paths(open(ARCHITECTURE).read())
    assert len(paths) >= 30
    assert [p for p in paths if not exists(p)] == []
