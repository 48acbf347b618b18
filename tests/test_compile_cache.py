"""torch.compile's disk caches are keyed on this build of fusedformer (fusedformer/compile_cache.py).

CI once failed on a graph that Inductor had cached under an earlier build, when ``attention_fwd`` took an
``int`` seed: torch keys custom ops by name only, so the cached code called the new op with ``seed=0``.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch._dynamo.utils import counters

import fusedformer as ff
from fusedformer import compile_cache


def test_the_tag_carries_this_builds_fingerprint():
    tag = torch.compiler.config.cache_key_tag
    assert compile_cache.TAG_PREFIX + compile_cache.fingerprint() in tag.split("+")


def test_the_fingerprint_follows_sources_and_the_extension(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "_C.so").write_bytes(b"\x7fELF one")
    (pkg / "notes.txt").write_text("not part of the build")
    first = compile_cache.fingerprint(pkg)
    assert first == compile_cache.fingerprint(pkg)  # a function of the files alone
    (pkg / "notes.txt").write_text("changed")
    assert compile_cache.fingerprint(pkg) == first
    (pkg / "sub" / "_C.so").write_bytes(b"\x7fELF two")
    second = compile_cache.fingerprint(pkg)
    assert second != first
    (pkg / "a.py").write_text("x = 2\n")
    assert compile_cache.fingerprint(pkg) != second
    shutil.move(pkg / "a.py", pkg / "b.py")  # a rename is a change too
    assert compile_cache.fingerprint(pkg) not in (first, second)


def test_a_users_tag_is_kept_and_an_old_builds_tag_replaced(monkeypatch):
    with torch.compiler.config.patch(cache_key_tag="mine+fusedformer-0123456789abcdef"):
        tag = compile_cache.tag_compile_caches()
        assert tag == "mine+" + compile_cache.TAG_PREFIX + compile_cache.fingerprint()
        assert compile_cache.tag_compile_caches() == tag  # idempotent


def _compile_once(q, k, v):
    torch._dynamo.reset()

    def fn(q, k, v):
        return ff.scaled_dot_product_attention(q, k, v, is_causal=True).sum()

    before = dict(counters["inductor"])
    torch.compile(fn, fullgraph=True)(q, k, v)
    return {key: counters["inductor"][key] - before.get(key, 0) for key in ("fxgraph_cache_hit", "fxgraph_cache_miss")}


def test_torch_keys_its_compile_cache_on_the_tag(tmp_path, monkeypatch):
    """What the protection rests on: torch mixes cache_key_tag into Inductor's cache key. If a torch
    release stopped doing so, a graph cached under another fusedformer build would be reused again."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    q, k, v = (torch.randn(1, 2, 17, 16) for _ in range(3))
    # config.patch, not monkeypatch: monkeypatch's undo hides a config module's entries from later tests
    with torch._inductor.config.patch(fx_graph_cache=True, force_disable_caches=False):
        _hits_then_misses_under_another_tag(q, k, v)


def _hits_then_misses_under_another_tag(q, k, v):
    try:
        assert _compile_once(q, k, v) == {"fxgraph_cache_hit": 0, "fxgraph_cache_miss": 1}
        assert _compile_once(q, k, v) == {"fxgraph_cache_hit": 1, "fxgraph_cache_miss": 0}
        # another build of fusedformer (another fingerprint): the same graph must miss
        with torch.compiler.config.patch(cache_key_tag=compile_cache.TAG_PREFIX + "0" * 16):
            assert _compile_once(q, k, v) == {"fxgraph_cache_hit": 0, "fxgraph_cache_miss": 1}
        assert _compile_once(q, k, v) == {"fxgraph_cache_hit": 1, "fxgraph_cache_miss": 0}
    finally:
        torch._dynamo.reset()


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-v"]))
