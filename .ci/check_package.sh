#!/usr/bin/env bash
# The shipped package, end to end: a clean clone -> sdist -> wheel built from the unpacked sdist -> the
# wheel installed into a fresh virtualenv -> a smoke test run from outside any source tree, with
# FUSEDFORMER_STRICT=1 (a reference-path fallback raises) and every warning an error (a torch mismatch
# or a _C that does not load fails it).
#
#   .ci/check_package.sh [PYTHON]    PYTHON: an interpreter with torch, setuptools, wheel and ninja
#                                    (default .venv/bin/python, what `make test` sets up)
#
# The wheel is built without build isolation (--no-build-isolation), against the given interpreter's
# torch; the fresh virtualenv gets that same torch version (pip's cache or local wheels serve it) and
# then the wheel with its dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${1:-.venv/bin/python}
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute, but not resolved: a venv's python is a link
WORK=$(mktemp -d /tmp/fusedformer-package.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
step() { echo "== check_package: $* ($(date +%T))"; }

step "sdist from a clean clone of HEAD"
git clone -q --no-local "$REPO" "$WORK/clone"
(cd "$WORK/clone" && "$PY" setup.py -q sdist -d "$WORK/dist" >/dev/null)
SDIST=$(ls "$WORK"/dist/fusedformer-*.tar.gz)
# everything the build compiles must be in it: every source and header under csrc/
tar tzf "$SDIST" | sed 's|^[^/]*/||' > "$WORK/sdist-files"
missing=$(cd "$WORK/clone" && git ls-files csrc | while read -r f; do grep -qxF "$f" "$WORK/sdist-files" || echo "$f"; done)
if [ -n "$missing" ]; then echo "the sdist lacks: $missing" >&2; exit 1; fi
if grep -E '\.so$|_build_info\.py$' "$WORK/sdist-files"; then echo "the sdist holds build outputs" >&2; exit 1; fi
echo "the sdist holds all $(cd "$WORK/clone" && git ls-files csrc | wc -l) files under csrc/"

step "wheel from the unpacked sdist"
mkdir "$WORK/src" && tar xzf "$SDIST" -C "$WORK/src"
(cd "$WORK"/src/fusedformer-* && "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/wheels" .)
WHEEL=$(ls "$WORK"/wheels/fusedformer-*.whl)
"$PY" -c 'import sys, zipfile; names = zipfile.ZipFile(sys.argv[1]).namelist()
assert any(n.startswith("fusedformer/_C") for n in names), "the wheel has no _C"
assert "fusedformer/_build_info.py" in names and "fusedformer/kernels/attention.py" in names, names' "$WHEEL"

step "the wheel in a fresh virtualenv"
TORCH=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q "torch==$TORCH"
"$WORK/venv/bin/pip" install -q "$WHEEL"

step "smoke test outside the source tree"
cd "$WORK"
FUSEDFORMER_STRICT=1 REPO="$REPO" "$WORK/venv/bin/python" -W error - <<'PYEOF'
import os

import torch
import torch.nn.functional as F

import fusedformer as ff
from fusedformer import _C

assert not os.path.realpath(ff.__file__).startswith(os.environ["REPO"]), ff.__file__
assert "site-packages" in ff.__file__, ff.__file__
assert _C.built_with_torch() == torch.__version__, (_C.built_with_torch(), torch.__version__)
torch.manual_seed(0)
q, k, v = (torch.randn(2, 4, 97, 64, requires_grad=True) for _ in range(3))
out = ff.scaled_dot_product_attention(q, k, v, is_causal=True)
qt, kt, vt = (t.detach().requires_grad_() for t in (q, k, v))
ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
torch.testing.assert_close(out, ref)
out.sum().backward()
ref.sum().backward()
for a, b in ((q, qt), (k, kt), (v, vt)):
    torch.testing.assert_close(a.grad, b.grad)
x, w, b = torch.randn(17, 1000), torch.randn(1000), torch.randn(1000)
torch.testing.assert_close(ff.layer_norm(x, [1000], w, b), F.layer_norm(x, [1000], w, b))
torch.testing.assert_close(ff.gelu(x, approximate="tanh"), F.gelu(x, approximate="tanh"))
e = ff.explain(ff.scaled_dot_product_attention, q, k, v, is_causal=True)
assert e.backend == "cpp", str(e)
print(e)
print("smoke test passed:", ff.__file__, "torch", torch.__version__, "kernels", _C.cpu_capability(),
      "of", _C.built_cpu_capabilities())
PYEOF
step "done"
