"""Offline GLUE stand-ins from real data shipped on PyPI.

The vaderSentiment==3.3.2 source archive holds hutto_ICWSM_2014.tar.gz: 10,605 movie-review
snippets with the mean rating of human judges on [-4, 4]. sst2-offline labels a snippet positive
or negative by the sign of that mean (near-neutral ones dropped); stsb-offline regresses the mean.
"""
import io
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# This file is imported as a top-level module (run_glue.py puts examples/glue on sys.path); the
# cache helper the examples share lives in the `examples` package at the repository root.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)
from examples._cache import cache_root, cached_file  # noqa: E402

VADER = "vaderSentiment==3.3.2"
VADER_ARCHIVE = "vaderSentiment-3.3.2.tar.gz"
NEUTRAL_BAND = 0.5  # |mean rating| below this is too close to call for a binary label


def _vader_archive(cache_dir: Path) -> Path:
    """The sdist, downloaded once even when several runs start together (examples/_cache.py)."""

    def download(tmp: Path) -> None:
        # pip copies into its -d folder in place, so it downloads elsewhere and only a complete
        # archive is moved under the cache's temporary name.
        with tempfile.TemporaryDirectory() as scratch:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "--no-build-isolation", "-d", scratch, VADER], check=True)
            found = sorted(Path(scratch).glob("vaderSentiment-3.3.2*.tar.gz"))
            if not found:
                raise FileNotFoundError(f"pip download {VADER} produced no source archive")
            tmp.write_bytes(found[0].read_bytes())

    cache_dir.mkdir(parents=True, exist_ok=True)
    return cached_file(cache_dir / VADER_ARCHIVE, download)


def movie_snippets(cache_dir=None) -> list[tuple[str, float]]:
    """(text, mean human rating) for every snippet of the ICWSM 2014 movie-review set; cache_dir
    defaults to the examples' cache (INTRADISTILL_CACHE or ~/.cache/intradistill_kernels)."""
    with tarfile.open(_vader_archive(Path(cache_dir) if cache_dir else cache_root())) as sdist:
        inner = next(m for m in sdist.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
        blob = sdist.extractfile(inner).read()
    with tarfile.open(fileobj=io.BytesIO(blob)) as data:
        member = next(m for m in data.getmembers() if "movieReviewSnippets_GroundTruth" in m.name)
        text = data.extractfile(member).read().decode("utf-8", errors="replace")
    rows = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            try:
                rows.append((parts[2].strip(), float(parts[1])))
            except ValueError:
                continue
    if not rows:
        raise ValueError("no snippets found in the vaderSentiment archive")
    return rows


def offline_split(task: str, cache_dir=None, eval_fraction: float = 0.1, seed: int = 0):
    """Train and validation lists of {"sentence", "label"} for sst2-offline or stsb-offline."""
    rows = movie_snippets(cache_dir)
    if task == "sst2-offline":
        rows = [{"sentence": t, "label": int(r > 0)} for t, r in rows if abs(r) >= NEUTRAL_BAND]
    elif task == "stsb-offline":
        rows = [{"sentence": t, "label": float(r)} for t, r in rows]
    else:
        raise ValueError(f"task must be 'sst2-offline' or 'stsb-offline', got {task!r}")
    random.Random(seed).shuffle(rows)
    n_eval = max(1, int(len(rows) * eval_fraction))
    return rows[n_eval:], rows[:n_eval]
