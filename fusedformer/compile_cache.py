"""torch.compile's on-disk caches know fusedformer's ops by name only; this gives them our build's fingerprint.

Inductor's FX-graph cache and AOTAutograd's cache key a compiled graph on the graph's code, torch's
version and the configs. A custom op (``torch.ops.fusedformer.*``) enters the key as its name: neither
its schema nor its kernels do. So a graph compiled under one build of fusedformer is reused under
another whose ops share the names, and the cached code can call an op with arguments its new schema
rejects (seen in CI: a graph cached when ``attention_fwd``'s seed was an ``int`` called the new
``Tensor? seed`` op with ``seed=0``) or, worse, rely on semantics that changed.

At import, :func:`tag_compile_caches` appends ``fusedformer-<fingerprint>`` to
``torch.compiler.config.cache_key_tag``, which torch mixes into every compile cache key. The fingerprint
hashes the package's Python sources (``fusedformer`` and its Triton kernels) and the compiled
extension, so any change to either misses the caches once and recompiles; an unchanged build keeps its
hits. A tag the user set is kept, ours appended (``"theirs+fusedformer-…"``). Setting
``cache_key_tag`` after importing fusedformer replaces ours: append to it instead.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

__all__ = ["fingerprint", "tag_compile_caches", "TAG_PREFIX"]

TAG_PREFIX = "fusedformer-"
_SUFFIXES = (".py", ".so", ".pyd", ".dylib")


def fingerprint(*roots: str | os.PathLike) -> str:
    """A 16-hex-digit hash of every Python source and shared library under ``roots`` (paths, contents).

    Without ``roots``: the installed package's own directory (``fusedformer``, its Triton kernels included).
    About 5 ms for the package (3 MB of extension, 0.5 MB of sources).
    """
    if not roots:
        roots = (Path(__file__).parent,)
    digest = hashlib.blake2b(digest_size=8)
    for root in roots:
        root = Path(root)
        files = sorted(p for p in root.rglob("*") if p.suffix in _SUFFIXES and p.is_file())
        for path in files:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()


def tag_compile_caches() -> str:
    """Appends ``fusedformer-<fingerprint>`` to ``torch.compiler.config.cache_key_tag`` (once).

    Returns the tag now in force. A tag from an earlier fusedformer build is replaced, the user's own
    part kept.
    """
    ours = TAG_PREFIX + fingerprint()
    parts = [p for p in torch.compiler.config.cache_key_tag.split("+") if p and not p.startswith(TAG_PREFIX)]
    torch.compiler.config.cache_key_tag = "+".join(parts + [ours])
    return torch.compiler.config.cache_key_tag
