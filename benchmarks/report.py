"""Writing a benchmark's result file."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: str | os.PathLike | None, result) -> None:
    """Write `result` as indented JSON to `path` (nothing when None), creating its folder. The file is replaced
    whole: a run killed mid-write (a device call's time limit) leaves the previous version, never half a file."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(result, indent=2))
    os.replace(partial, path)
