"""Every cache the examples write, filled by several processes started together on an empty cache.

Each worker imports what it needs, then waits at a barrier so that all of them reach the cache in
the same instant, as two training runs launched side by side do. All must succeed, read the same
bytes through one published file or directory (one inode), do the expensive work (download,
unpacking, tokenizer training) once between them, and leave no temporary name behind.

The races (four processes each) are in the full tier; the single-process cases in `make test`.
"""
import hashlib
import multiprocessing as mp
import os
import random
import shutil
import string
import sys
import time
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKERS = 4
SPAWN = mp.get_context("spawn")  # fresh interpreters, as separate runs are; fork would share imports


def _run_together(target, *args, workers: int = WORKERS, timeout: float = 120.0) -> list:
    barrier = SPAWN.Barrier(workers)
    results = SPAWN.Queue()
    procs = [SPAWN.Process(target=_worker, args=(target, barrier, results, i) + args) for i in range(workers)]
    for p in procs:
        p.start()
    try:
        out = [results.get(timeout=timeout) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    failures = [o[1] for o in out if o[0] != "ok"]
    assert not failures, "\n".join(failures)
    return [o[1] for o in sorted(out, key=lambda o: o[2])]


def _worker(target, barrier, results, index, *args):
    try:
        run = target(*args)  # imports and inputs before the barrier, so the race is on the cache alone
        barrier.wait(timeout=60)
        results.put(("ok", run(), index))
    except BaseException:  # the parent reports every worker's traceback
        results.put(("error", f"worker {index}:\n{traceback.format_exc()}", index))


def _leftovers(cache: Path) -> list[str]:
    names = (str(p.relative_to(cache)) for p in cache.rglob("*"))
    return sorted(n for n in names if n.endswith(".tmp") or Path(n).name.startswith("tmp"))


def _log_call(log: str) -> None:
    with open(log, "a") as f:  # O_APPEND: one whole line per call, whichever process writes
        f.write(f"{os.getpid()}\n")


def _count_calls(owner, name: str, log: str, counted=lambda *a, **k: True) -> None:
    """Wraps owner.name (in this worker only) to append a line to `log` per counted call, then
    make the real call: how the tests see how many times the expensive work was done."""
    real = getattr(owner, name)

    def counting(*args, **kwargs):
        if counted(*args, **kwargs):
            _log_call(log)
        return real(*args, **kwargs)

    setattr(owner, name, counting)


def _calls(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _digest(p) for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


# --------------------------------------------------------------------------- the helper itself

def _slow_bytes(seed: int) -> bytes:
    return random.Random(seed).randbytes(1 << 20)


def _file_race(target: str, log: str, seed: int):
    sys.path.insert(0, str(ROOT))
    from examples._cache import cached_file

    def build(tmp: Path) -> None:
        _log_call(log)
        data = _slow_bytes(seed)
        with open(tmp, "wb") as f:  # written in pieces, slowly: a reader of a non-atomic file would see a prefix
            for i in range(0, len(data), 1 << 18):
                f.write(data[i:i + (1 << 18)])
                f.flush()
                time.sleep(0.05)

    def run():
        path = cached_file(Path(target), build)
        return _digest(path), path.stat().st_ino

    return run


@pytest.mark.full
def test_cached_file_builds_once_and_readers_see_whole_files(tmp_path):
    seed = random.randrange(1 << 30)
    target, log = tmp_path / "cache" / "blob.bin", tmp_path / "builds.log"
    target.parent.mkdir()
    seen = _run_together(_file_race, str(target), str(log), seed)
    assert {s for s, _ in seen} == {hashlib.sha256(_slow_bytes(seed)).hexdigest()}
    assert len({ino for _, ino in seen}) == 1
    assert _calls(log) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == [".blob.bin.lock", "blob.bin"]


def _dir_race(target: str, log: str, seed: int):
    sys.path.insert(0, str(ROOT))
    from examples._cache import cached_dir

    def build(tmp: Path) -> None:
        _log_call(log)
        rng = random.Random(seed)
        for i in range(8):
            sub = tmp / f"d{i % 3}"
            sub.mkdir(exist_ok=True)
            (sub / f"f{i}").write_bytes(rng.randbytes(4096))
            time.sleep(0.03)

    def run():
        path = cached_dir(Path(target), build)
        return _tree_digest(path), path.stat().st_ino

    return run


@pytest.mark.full
def test_cached_dir_builds_once_and_publishes_whole_trees(tmp_path):
    seed = random.randrange(1 << 30)
    target, log = tmp_path / "cache" / "tree", tmp_path / "builds.log"
    seen = _run_together(_dir_race, str(target), str(log), seed)
    trees = [t for t, _ in seen]
    assert all(t == trees[0] for t in trees) and len(trees[0]) == 9  # 8 files and the marker
    assert len({ino for _, ino in seen}) == 1
    assert _calls(log) == 1
    assert _leftovers(target.parent) == []


def test_failed_build_leaves_nothing_and_the_next_one_succeeds(tmp_path):
    from examples._cache import cached_dir, cached_file

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("network gone")

    with pytest.raises(OSError, match="network gone"):
        cached_file(tmp_path / "f", half_then_fail)
    with pytest.raises(OSError, match="network gone"):
        cached_dir(tmp_path / "d", lambda tmp: half_then_fail(tmp / "part"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.lock", ".f.lock"]  # locks only
    payload = os.urandom(64)
    assert cached_file(tmp_path / "f", lambda tmp: tmp.write_bytes(payload)).read_bytes() == payload


def test_stale_temporaries_and_incomplete_old_entries_are_replaced(tmp_path):
    from examples._cache import DONE, cached_dir, cached_file

    # What a run killed mid-build leaves: its temporary file or directory.
    (tmp_path / ".f.0123456789ab.tmp").write_bytes(b"partial")
    (tmp_path / ".d.0123456789ab.tmp").mkdir()
    # What the code before this helper left when interrupted: the entry itself, without its marker.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "partial").write_bytes(b"x")
    payload = os.urandom(32)
    assert cached_file(tmp_path / "f", lambda tmp: tmp.write_bytes(payload)).read_bytes() == payload
    built = cached_dir(tmp_path / "d", lambda tmp: (tmp / "whole").write_bytes(payload))
    assert sorted(p.name for p in built.iterdir()) == [DONE, "whole"]
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- the examples' caches

def _spm_race(model_file: str, log: str, seed: int):
    sys.path.insert(0, str(ROOT))
    import sentencepiece as spm

    from examples.translation import data

    _count_calls(spm.SentencePieceTrainer, "train", log)

    rng = random.Random(seed)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9))) for _ in range(400)]
    pairs = [(" ".join(rng.choices(words, k=rng.randint(4, 15))), " ".join(rng.choices(words, k=rng.randint(4, 15))))
             for _ in range(3000)]

    def run():
        path = data.sentencepiece_model(pairs, 300, Path(model_file))
        sp = spm.SentencePieceProcessor(model_file=str(path))  # where the half-written file used to fail
        return _digest(path), path.stat().st_ino, sp.get_piece_size(), sp.encode(pairs[0][0])

    return run


@pytest.mark.full
def test_sentencepiece_model_trained_once_by_runs_started_together(tmp_path):
    pytest.importorskip("sentencepiece")
    model_file, log = tmp_path / "spm" / "toy-300.model", tmp_path / "trainings.log"
    seen = _run_together(_spm_race, str(model_file), str(log), random.randrange(1 << 30))
    assert _calls(log) == 1
    assert all(s[0] == seen[0][0] and s[1] == seen[0][1] and s[3] == seen[0][3] for s in seen)
    assert seen[0][2] == 300
    assert sorted(p.name for p in model_file.parent.iterdir()) == [".toy-300.model.lock", "toy-300.model"]


def _downloads(args, *rest, **kwargs) -> bool:
    return "download" in args


def _debian_race(cache: str, log: str, package: str):
    sys.path.insert(0, str(ROOT))
    from examples.translation import data

    _count_calls(data.subprocess, "run", log, _downloads)

    def run():
        root = data.fetch_debian_package(package, Path(cache))
        return _tree_digest(root), root.stat().st_ino

    return run


@pytest.mark.full
def test_debian_package_unpacked_once_by_runs_started_together(tmp_path):
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("the Debian cache needs apt-get and dpkg-deb")
    cache, log = tmp_path / "cache", tmp_path / "downloads.log"
    # `hello`: a 50 kB real package, the same download and unpacking path as trans-de-en's 6 MB
    seen = _run_together(_debian_race, str(cache), str(log), "hello")
    assert _calls(log) == 1
    trees = [t for t, _ in seen]
    assert all(t == trees[0] for t in trees) and "usr/bin/hello" in trees[0]
    assert len({ino for _, ino in seen}) == 1
    assert _leftovers(cache) == []
    assert sorted(p.name for p in (cache / "debian").iterdir()) == [".apt.lock", "hello"]


def _vader_race(cache: str, log: str):
    sys.path.insert(0, str(ROOT / "examples" / "glue"))
    import offline_data

    _count_calls(offline_data.subprocess, "run", log, _downloads)

    def run():
        rows = offline_data.movie_snippets(cache)
        archive = Path(cache) / offline_data.VADER_ARCHIVE
        return len(rows), rows[0], _digest(archive), archive.stat().st_ino

    return run


@pytest.mark.full
def test_glue_archive_downloaded_once_by_runs_started_together(tmp_path):
    cache, log = tmp_path / "cache", tmp_path / "downloads.log"
    seen = _run_together(_vader_race, str(cache), str(log))
    assert _calls(log) == 1
    assert all(s == seen[0] for s in seen)
    assert seen[0][0] == 10605  # every snippet of the ICWSM 2014 movie-review set
    archive = "vaderSentiment-3.3.2.tar.gz"
    assert sorted(p.name for p in cache.iterdir()) == [f".{archive}.lock", archive]
