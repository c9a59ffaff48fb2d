"""Remove validation and test records whose input already appears in train, exactly or nearly.

Two inputs are near duplicates when the sets of 5-character shingles of their normalised texts
have a Jaccard similarity at or above a threshold. Comparing every pair would be quadratic, so
MinHash signatures with LSH banding propose candidate pairs, and each candidate is then checked
with the exact Jaccard similarity (of 64-bit shingle hashes, whose collisions are negligible). So
no pair below the threshold is ever reported, while a pair at or above it is missed only rarely:
see ``_RECALL_AT_THRESHOLD`` and, for data whose inputs share a long template, ``_MAX_BUCKET``.
"""

from collections.abc import Callable

import numpy as np

from tunesmith.errors import TunesmithError

SHINGLE_CHARS = 5
NUM_PERM = 128
# Bands are chosen so that a pair exactly at the threshold becomes a candidate with at least this
# probability (pairs above it, more surely still); extra candidates only cost a verification.
_RECALL_AT_THRESHOLD = 0.999
MAX_EXAMPLES = 5
_EXAMPLE_CHARS = 200
# Characters hashed per batch: small enough for the batch's arrays to stay in the CPU cache.
_BATCH_CHARS = 65536
# Limits on the work per query, which only bind when most inputs resemble each other (a long
# shared template): texts taken from one LSH bucket, and candidates checked exactly.
_MAX_BUCKET = 256
_MAX_VERIFIED = 32

# Fixed seed: the same data must give the same report on every run and machine.
_rng = np.random.default_rng(20240611)
_UINT64_HIGH = 2**64
# Multiply-add-shift hashing (Dietzfelbinger 1996): for a 32-bit x, ((a*x + b) mod 2^64) >> 32 is
# a universal family with 32-bit values; numpy's uint64 wrap-around does the mod 2^64 for free.
_PERM_A = _rng.integers(1, _UINT64_HIGH, NUM_PERM, dtype=np.uint64) | np.uint64(1)
_PERM_B = _rng.integers(0, _UINT64_HIGH, NUM_PERM, dtype=np.uint64)
# Odd multipliers that fold the code points of a shingle, and the values of a band, into one key.
_SHINGLE_MULT = _rng.integers(1, _UINT64_HIGH, SHINGLE_CHARS, dtype=np.uint64) | np.uint64(1)
_BAND_MULT = _rng.integers(1, _UINT64_HIGH, NUM_PERM, dtype=np.uint64) | np.uint64(1)
_BAND_SALT = _rng.integers(0, _UINT64_HIGH, NUM_PERM, dtype=np.uint64)


def normalize_key(text: str) -> str:
    """Lowercase ``text`` and collapse whitespace: the form in which inputs are compared."""
    return " ".join(text.lower().split())


def audit_leakage(
    splits: dict[str, list[dict]], key: Callable[[dict], str], threshold: float = 0.8
) -> tuple[dict[str, list[dict]], dict]:
    """Drop validation and test records whose input ``key(record)`` duplicates an earlier split's.

    A validation record leaks when its input, after :func:`normalize_key`, equals a train input
    ("exact") or has a shingle Jaccard similarity >= ``threshold`` with one ("near"). A test record
    leaks in the same way against train and against the validation records that were kept. Train
    is never changed, and kept records keep their order.

    Returns:
        The new splits (other keys of ``splits`` passed through) and a report::

            {"validation": {"exact": n, "near": m}, "test": {"exact": n, "near": m},
             "examples": [{"split": "test", "kind": "near", "similarity": 0.91,
                           "text": ..., "match_split": "train", "match": ...}, ...]}

        with at most MAX_EXAMPLES examples, texts cut to 200 characters.

    Raises:
        TunesmithError: ``threshold`` is not in (0, 1].
    """
    if not 0 < threshold <= 1:
        raise TunesmithError(f"near-duplicate threshold must be above 0 and at most 1, got {threshold}")
    names = ("train", "validation", "test")
    raw = [key(record) for name in names for record in splits.get(name, [])]
    corpus = _Corpus([normalize_key(text) for text in raw], threshold)
    # Documents are numbered across the splits in order: train, then validation, then test.
    sizes = [len(splits.get(name, [])) for name in names]
    first = dict(zip(names, np.cumsum([0] + sizes).tolist()))
    report: dict = {"validation": {"exact": 0, "near": 0}, "test": {"exact": 0, "near": 0}, "examples": []}

    def remove_leaks(name: str, indexes: dict[str, _Index]) -> tuple[list[dict], list[int]]:
        kept, kept_docs = [], []
        for doc, record in enumerate(splits.get(name, []), first[name]):
            match = _first_match(doc, indexes)
            if match is None:
                kept.append(record)
                kept_docs.append(doc)
                continue
            match_split, kind, other, similarity = match
            report[name][kind] += 1
            if len(report["examples"]) < MAX_EXAMPLES:
                report["examples"].append({
                    "split": name, "kind": kind, "similarity": round(similarity, 3),
                    "text": _shorten(raw[doc]), "match_split": match_split, "match": _shorten(raw[other]),
                })
        return kept, kept_docs

    train_index = _Index(corpus, range(first["train"], first["validation"]))
    validation, validation_docs = remove_leaks("validation", {"train": train_index})
    # Test is checked against the validation records that stay, so that the two cannot overlap.
    test, _ = remove_leaks("test", {"train": train_index, "validation": _Index(corpus, validation_docs)})
    return {**splits, "validation": validation, "test": test}, report


class _Corpus:
    """Normalised texts with their MinHash signatures and LSH band keys."""

    def __init__(self, texts: list[str], threshold: float):
        self.texts = texts
        self.threshold = threshold
        self.signatures = _signatures(texts)
        self.band_keys = _band_keys(self.signatures, *_banding(threshold))
        # A candidate whose signature agrees on fewer values than this is not worth an exact check:
        # the estimate has this standard deviation, and a true match falls 4 of them short of the
        # threshold with probability 3e-5.
        sd = (threshold * (1 - threshold) / NUM_PERM) ** 0.5
        self.min_estimate = threshold - 4 * sd
        self._sets: dict[int, frozenset[int]] = {}

    def jaccard(self, a: int, b: int) -> float:
        """Exact Jaccard similarity of the shingle sets of texts ``a`` and ``b``."""
        set_a, set_b = self._shingle_set(a), self._shingle_set(b)
        common = len(set_a & set_b)
        return common / (len(set_a) + len(set_b) - common)

    def _shingle_set(self, doc: int) -> frozenset[int]:
        # Made on demand: only candidates need one, and keeping every text's would cost memory.
        if doc not in self._sets:
            self._sets[doc] = frozenset(_shingle_hashes([self.texts[doc]])[0].tolist())
        return self._sets[doc]


class _Index:
    """Texts that later ones are matched against: by exact text, and by LSH band keys.

    Band keys of all indexed texts sit in one sorted array, so that the texts sharing a band with a
    query are a binary search away, with no Python dict of buckets to build.
    """

    def __init__(self, corpus: _Corpus, docs):
        self.corpus = corpus
        self.by_text: dict[str, int] = {}
        for doc in docs:
            # An exact copy of an indexed text would only ever match where the first one does.
            self.by_text.setdefault(corpus.texts[doc], doc)
        indexed = np.array([doc for text, doc in self.by_text.items() if text], dtype=np.int64)
        keys = corpus.band_keys[indexed].ravel()
        # Stable, so texts sharing a key stay in document order and the results are reproducible.
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        self.members = np.repeat(indexed, corpus.band_keys.shape[1])[order]

    def match(self, doc: int) -> tuple[str, int, float] | None:
        """``(kind, indexed text, similarity)`` of a duplicate of text ``doc``, or None.

        Near-duplicate candidates are checked in order of estimated similarity, so the one
        reported is usually the closest.
        """
        corpus = self.corpus
        text = corpus.texts[doc]
        if text in self.by_text:
            return "exact", self.by_text[text], 1.0
        if not text:
            return None
        query = corpus.band_keys[doc]
        lows, highs = np.searchsorted(self.keys, query, "left"), np.searchsorted(self.keys, query, "right")
        # When inputs share a long template, buckets hold most of the data and every query would
        # be compared with everything; the cap keeps the work linear, at some risk of missing a
        # duplicate in such data only.
        found = [
            self.members[low : min(high, low + _MAX_BUCKET)] for low, high in zip(lows, highs) if high > low
        ]
        if not found:
            return None
        candidates = np.unique(np.concatenate(found))
        estimates = (corpus.signatures[candidates] == corpus.signatures[doc]).mean(axis=1)
        for i in np.argsort(-estimates, kind="stable")[:_MAX_VERIFIED]:
            if estimates[i] < corpus.min_estimate:
                break
            similarity = corpus.jaccard(doc, int(candidates[i]))
            if similarity >= corpus.threshold:
                return "near", int(candidates[i]), similarity
        return None


def _first_match(doc: int, indexes: dict[str, _Index]) -> tuple[str, str, int, float] | None:
    for split, index in indexes.items():
        match = index.match(doc)
        if match is not None:
            return (split, *match)
    return None


def _shorten(text: str) -> str:
    return text if len(text) <= _EXAMPLE_CHARS else text[: _EXAMPLE_CHARS - 1] + "\u2026"


def _signatures(texts: list[str]) -> np.ndarray:
    """MinHash signatures, shape (texts, NUM_PERM); a text without shingles gets all 2^32 - 1.

    Texts are processed in batches of about _BATCH_CHARS characters: the arrays then stay in the
    CPU cache across the NUM_PERM passes, which is several times faster than one pass over all.
    """
    signatures = np.full((len(texts), NUM_PERM), 2**32 - 1, dtype=np.uint32)
    start = 0
    while start < len(texts):
        end, chars = start, 0
        while end < len(texts) and (end == start or chars + len(texts[end]) <= _BATCH_CHARS):
            chars += len(texts[end])
            end += 1
        hashes, bounds = _shingle_hashes(texts[start:end])
        nonempty = np.flatnonzero(bounds[:-1] < bounds[1:])
        if len(nonempty):
            signatures[start + nonempty] = _minhash(hashes, bounds[nonempty]).T
        start = end
    return signatures


def _shingle_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every shingle of every text, and where each text's hashes start.

    The texts are joined into one array of code points, so that hashing is a few numpy operations
    whatever the number of texts; windows that straddle two texts are then left out. The hashes
    of text ``i`` are ``hashes[bounds[i]:bounds[i + 1]]``.
    """
    # A text shorter than a shingle is a single shingle of its own (padded); an empty one has none.
    padded = [text.ljust(SHINGLE_CHARS, "\0") if text else text for text in texts]
    lengths = np.array([len(text) for text in padded], dtype=np.int64)
    counts = np.maximum(lengths - SHINGLE_CHARS + 1, 0)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    codes = np.frombuffer("".join(padded).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)

    n_windows = max(len(codes) - SHINGLE_CHARS + 1, 0)
    window_hash = np.zeros(n_windows, dtype=np.uint64)
    for offset in range(SHINGLE_CHARS):
        window_hash += codes[offset : offset + n_windows] * _SHINGLE_MULT[offset]
    # Shingle j of text i starts at text_start[i] + (j - bounds[i]).
    text_start = np.cumsum(lengths) - lengths
    starts = np.repeat(text_start - bounds[:-1], counts) + np.arange(bounds[-1])
    return _mix64(window_hash[starts]), bounds


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: spreads every input bit over all 64 output bits."""
    x = x ^ (x >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _minhash(hashes: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Minimum of each run ``hashes[starts[i]:starts[i + 1]]`` under each permutation: (NUM_PERM, runs)."""
    x = hashes >> np.uint64(32)  # the hash family takes 32-bit inputs
    value = np.empty_like(x)
    minima = np.empty((NUM_PERM, len(starts)), dtype=np.uint32)
    for perm in range(NUM_PERM):
        np.multiply(x, _PERM_A[perm], out=value)
        value += _PERM_B[perm]
        value >>= np.uint64(32)
        minima[perm] = np.minimum.reduceat(value, starts)
    return minima


def _banding(threshold: float) -> tuple[int, int]:
    """``(bands, rows)``: the most rows per band (fewest false candidates) meeting the recall target.

    Two texts with Jaccard similarity s agree on each signature value with probability s, so they
    share at least one of b bands of r rows with probability 1 - (1 - s^r)^b.
    """
    for rows in range(NUM_PERM, 0, -1):
        bands = NUM_PERM // rows
        if 1 - (1 - threshold**rows) ** bands >= _RECALL_AT_THRESHOLD:
            return bands, rows
    return NUM_PERM, 1


def _band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per (text, band), unique to the band: texts with an equal key are candidates."""
    banded = signatures[:, : bands * rows].reshape(len(signatures), bands, rows).astype(np.uint64)
    return (banded * _BAND_MULT[:rows]).sum(axis=2, dtype=np.uint64) + _BAND_SALT[:bands]
