"""Find model files in a local directory or on the Hugging Face hub.

Every loader (CSM, Mimi, tokenizer) goes through `find_files`, so "local path or hub id" behaves the same
everywhere: a directory is searched as is, anything else is treated as a hub repo id and fetched with
`huggingface_hub` (which honours HF_HUB_OFFLINE and its cache). When nothing can be found the error names the
files that were looked for and where.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence


class ModelFilesNotFound(FileNotFoundError):
    """Raised when none of the candidate files for a model can be found locally or on the hub."""


def find_files(source: str | os.PathLike, candidates: Sequence[str], *, revision: str | None = None) -> Path:
    """Return the path of the first of `candidates` available from `source`.

    `source` is a local directory, a local file (returned as is), or a hub repo id such as "sesame/csm-1b".
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in candidates:
            if (path / name).is_file():
                return path / name
        present = sorted(p.name for p in path.iterdir())[:20]
        raise ModelFilesNotFound(
            f"none of {list(candidates)} found in directory {path} (it contains: {present or 'nothing'})"
        )
    if _looks_like_local_path(str(source)):
        raise ModelFilesNotFound(f"{source} does not exist (expected a directory holding one of {list(candidates)})")
    return _hub_download(str(source), candidates, revision)


def _looks_like_local_path(source: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else (./x, /x, ~/x, a/b/c, x.safetensors) is meant as a path.
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or source.endswith((".pt", ".safetensors"))


def _hub_download(repo_id: str, candidates: Sequence[str], revision: str | None) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise ModelFilesNotFound(f"{repo_id!r} is not a local directory and huggingface_hub is not installed") from e

    errors = []
    for name in candidates:
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision))
        except Exception as e:  # noqa: BLE001 - the hub raises many types; we report them all together
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise ModelFilesNotFound(
        f"could not get any of {list(candidates)} for hub repo {repo_id!r} (no such local directory, and the hub "
        f"download failed: offline, gated or missing). Download the files on a connected machine and pass the "
        f"directory instead. Details: " + "; ".join(errors)
    )
