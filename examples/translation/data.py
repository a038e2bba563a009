"""Sentence-pair data for the translation example.

Offline default (real data shipped by Debian): German->English example sentences of the Ding
dictionary (package trans-de-en, GPL-2+), fetched at run time with `apt-get download` into a
cache. Also offline: Spanish->English Bible verses (Reina-Valera 1909 and King James, public
domain, Debian's sword-text-sparv and sword-text-kjv), aligned by verse. For users with a network: IWSLT'14 XX->En as prepared by fairseq's prepare-iwslt14.sh
(plain-text files), and WMT'17 En->De through the `datasets` library.
"""

from __future__ import annotations

import functools
import hashlib
import html
import io
import random
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

from .._cache import cache_root, cached_dir, cached_file

IWSLT14_PAIRS = ("ar", "de", "es", "fa", "he", "it", "nl", "pl")  # each XX -> en, as in the paper


def cache_dir() -> Path:
    return cache_root()


def fetch_debian_package(name: str, cache: Path | None = None) -> Path:
    """Downloads and unpacks a Debian package (no install, no root needed for the unpacking);
    returns the directory it was unpacked into. Cached: a second call does no network access, and
    runs started together download it once (see examples/_cache.py)."""
    debian = (cache or cache_dir()) / "debian"

    def unpack(into: Path) -> None:
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise RuntimeError(f"fetching the Debian package {name!r} needs apt-get and dpkg-deb "
                               "(a Debian-based system)")
        with tempfile.TemporaryDirectory() as tmp:
            for attempt in range(2):
                run = subprocess.run(["apt-get", "download", name], cwd=tmp, capture_output=True, text=True)
                if run.returncode == 0:
                    break
                if attempt == 0:  # a fresh machine may have no package lists yet
                    subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
            else:
                raise RuntimeError(f"apt-get download {name} failed:\n{run.stderr.strip()}")
            (deb,) = Path(tmp).glob(f"{name}_*.deb")
            subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)

    # One lock for every package, not one each: two `apt-get update`s at once fail on apt's own lock.
    return cached_dir(debian / name, unpack, lock=debian / ".apt.lock")


_ANNOTATION = re.compile(r"\s*(\{[^}]*\}|\[[^\]]*\])")


def parse_ding(path: Path) -> list[tuple[str, str]]:
    """Full-sentence pairs from a Ding dictionary file (`de | de :: en | en` lines).

    Alternatives separated by ' | ' are aligned between the two sides; a pair is kept when both
    sides are sentences (4+ words, final punctuation) without ';'-separated variants. Grammar
    annotations such as {m} or [geol.] are removed. Sorted and deduplicated: deterministic.
    """
    pairs = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or " :: " not in line:
                continue
            de, en = line.rstrip("\n").split(" :: ", 1)
            des, ens = de.split(" | "), en.split(" | ")
            if len(des) != len(ens):
                continue
            for d, e in zip(des, ens):
                d, e = _ANNOTATION.sub("", d).strip(), _ANNOTATION.sub("", e).strip()
                if ";" in d or ";" in e:
                    continue
                if len(d.split()) >= 4 and len(e.split()) >= 4 and d[-1:] in ".!?" and e[-1:] in ".!?":
                    pairs.add((d, e))
    return sorted(pairs)


@functools.lru_cache(maxsize=2)  # parsing takes seconds; a process (tests, sensitivity) reads it often
def load_trans_de_en(cache: Path | None = None) -> tuple[tuple[str, str], ...]:
    root = fetch_debian_package("trans-de-en", cache)
    return tuple(parse_ding(root / "usr" / "share" / "trans" / "de-en"))


_OSIS_DROPPED = re.compile(r"<(note|title)\b[^>]*>.*?</\1>", re.S)  # footnotes, headings: not verse text
_OSIS_TAG = re.compile(r"<[^>]*>")


def read_ztext(module_dir: Path) -> list[str]:
    """Every entry of a SWORD zText module (zlib-compressed, as Debian ships them), in index order.

    The layout, per testament: .bzv holds one 10-byte record per entry (block number, offset in
    the uncompressed block, size), .bzs one 12-byte record per block (offset and size in .bzz,
    uncompressed size), .bzz the zlib blocks. Two modules with the same versification have the
    same entries at the same indices (headers included), which is what aligns the translations.
    """
    entries = []
    for testament in ("ot", "nt"):
        bzv = (module_dir / f"{testament}.bzv").read_bytes()
        bzs = (module_dir / f"{testament}.bzs").read_bytes()
        bzz = (module_dir / f"{testament}.bzz").read_bytes()
        blocks: dict[int, bytes] = {}
        for i in range(len(bzv) // 10):
            block, offset, size = struct.unpack_from("<IIH", bzv, 10 * i)
            if size == 0:
                entries.append("")
                continue
            if block not in blocks:
                start, length, _ = struct.unpack_from("<III", bzs, 12 * block)
                blocks[block] = zlib.decompress(bzz[start:start + length])
            entries.append(blocks[block][offset:offset + size].decode("utf-8"))
    return entries


def osis_to_text(entry: str) -> str:
    text = _OSIS_TAG.sub("", _OSIS_DROPPED.sub("", entry))
    return " ".join(html.unescape(text).replace("\u00b6", " ").split())


def _sword_module(package: str, cache: Path | None) -> Path:
    root = fetch_debian_package(package, cache) / "usr" / "share" / "sword"
    confs = sorted((root / "mods.d").glob("*.conf"))
    if len(confs) != 1:
        raise RuntimeError(f"expected one SWORD module in {package}, found {[c.name for c in confs]}")
    conf = dict(line.split("=", 1) for line in confs[0].read_text(encoding="utf-8").splitlines() if "=" in line)
    if conf.get("ModDrv") != "zText" or conf.get("CompressType") != "ZIP" or conf.get("Versification", "KJV") != "KJV":
        raise RuntimeError(f"{package}: expected a ZIP-compressed zText module in KJV versification, got {conf}")
    (module_dir,) = (root / "modules" / "texts" / "ztext").iterdir()
    return module_dir


@functools.lru_cache(maxsize=2)
def load_bible_es_en(cache: Path | None = None) -> tuple[tuple[str, str], ...]:
    """Spanish->English verse pairs: Reina-Valera 1909 (sword-text-sparv) with the King James
    Version (sword-text-kjv), both in KJV versification, so entry i of one is entry i of the
    other. Verses empty on either side (headers, verses a translation merges) are dropped."""
    es = read_ztext(_sword_module("sword-text-sparv", cache))
    en = read_ztext(_sword_module("sword-text-kjv", cache))
    if len(es) != len(en):
        raise RuntimeError(f"the two Bible modules are not aligned ({len(es)} vs {len(en)} entries)")
    pairs = [(osis_to_text(s), osis_to_text(t)) for s, t in zip(es, en)]
    return tuple((s, t) for s, t in pairs if len(s.split()) >= 2 and len(t.split()) >= 2)


def load_iwslt14(src: str, data_dir: str | Path) -> dict[str, list[tuple[str, str]]]:
    """IWSLT'14 {src}->en from the text files of fairseq's examples/translation/prepare-iwslt14.sh
    (train/valid/test.{src,en}, one sentence a line; that script downloads the IWSLT release).
    The paper's cleaning is applied later, on subword lengths."""
    if src not in IWSLT14_PAIRS:
        raise ValueError(f"IWSLT'14 source language must be one of {IWSLT14_PAIRS}, got {src!r}")
    root = Path(data_dir)
    splits = {}
    for split in ("train", "valid", "test"):
        s, t = root / f"{split}.{src}", root / f"{split}.en"
        if not s.exists() or not t.exists():
            raise FileNotFoundError(f"expected {s} and {t} (run fairseq's prepare-iwslt14.sh for {src}-en)")
        splits[split] = list(zip(s.read_text(encoding="utf-8").splitlines(), t.read_text(encoding="utf-8").splitlines()))
    return splits


def load_wmt17_en_de() -> dict[str, list[tuple[str, str]]]:
    """WMT'17 En->De from the Hugging Face hub (newstest2016 as valid, newstest2017 as test)."""
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise ImportError("WMT'17 loading needs `pip install datasets` and network access") from e
    ds = load_dataset("wmt17", "de-en")
    return {
        split: [(ex["translation"]["en"], ex["translation"]["de"]) for ex in ds[name]]
        for split, name in (("train", "train"), ("valid", "validation"), ("test", "test"))
    }


def split_pairs(pairs: list[tuple[str, str]], valid: int, test: int, seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """Held-out valid/test splits chosen by a seeded shuffle; no sentence of them is trained on
    (pairs sharing a source sentence go to the same split)."""
    by_source: dict[str, list[tuple[str, str]]] = {}
    for pair in pairs:
        by_source.setdefault(pair[0], []).append(pair)
    sources = sorted(by_source)
    random.Random(seed).shuffle(sources)
    test_src, valid_src, train_src = sources[:test], sources[test:test + valid], sources[test + valid:]
    return {
        name: [p for s in group for p in by_source[s]]
        for name, group in (("train", train_src), ("valid", valid_src), ("test", test_src))
    }


def clean_pairs(pairs, tokenize, max_len: int = 175, max_ratio: float = 1.5):
    """The paper's filter (from fairseq's clean-corpus): drop pairs with an empty side, more than
    max_len subwords on a side, or a length ratio above max_ratio."""
    kept = []
    for s, t in pairs:
        ls, lt = len(tokenize(s)), len(tokenize(t))
        if 0 < ls <= max_len and 0 < lt <= max_len and max(ls, lt) <= max_ratio * min(ls, lt):
            kept.append((s, t))
    return kept


def fingerprint(pairs) -> str:
    h = hashlib.sha1()
    for s, t in pairs:
        h.update(s.encode())
        h.update(b"\t")
        h.update(t.encode())
        h.update(b"\n")
    return h.hexdigest()[:12]


def sentencepiece_model(pairs, vocab_size: int, model_file: Path) -> Path:
    """A joint SentencePiece model (unigram; pad, unk, bos, eos = 0, 1, 2, 3) trained on both sides
    of `pairs`, cached at model_file. Runs started together train it once; the others wait for it
    and never read a half-written file (see examples/_cache.py)."""

    def train(tmp: Path) -> None:
        import sentencepiece as spm

        # model_writer: the trainer hands back the serialized model instead of writing
        # <prefix>.model itself, so the only file written is the one published atomically.
        proto = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter([s for pair in pairs for s in pair]), model_writer=proto,
            vocab_size=vocab_size, character_coverage=1.0, model_type="unigram",
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2,
        )
        tmp.write_bytes(proto.getvalue())

    model_file = Path(model_file)
    model_file.parent.mkdir(parents=True, exist_ok=True)
    return cached_file(model_file, train)
