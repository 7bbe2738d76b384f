#!/usr/bin/env bash
# Non-Python tools the tests use (helm, ...), installed under .tools/. Idempotent.
set -euo pipefail
mkdir -p .tools/bin
