"""Small file helpers shared by the backends (kept here so no backend imports another)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as JSON by fsync and rename: a reader sees the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
