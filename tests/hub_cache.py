"""A Hugging Face hub cache on disk, laid out as `huggingface_hub` lays it out, for offline hub-id tests.

<cache>/models--<owner>--<name>/
    blobs/<sha256>                      the file contents, once each
    refs/<revision>                     the commit a branch points at
    snapshots/<commit>/<path>           relative symlinks into blobs/
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def put_in_hub_cache(cache: Path, repo_id: str, folder: Path, revision: str = "main") -> Path:
    """Copy every file of `folder` into `cache` as the snapshot of `repo_id` at `revision`; returns the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot
