"""Where a run's files live: a local folder or an object-store URL (`gs://bucket/run`), as one `etils.epath.Path`.

Every file a training run writes or reads in its workdir (and a bundle's files) goes through `as_path`, so
`--workdir=gs://bucket/run` works on every host: epath sends URLs to fsspec (gcsfs, `pip install -e
'.[cloud]'`) or TensorFlow's gfile, and Orbax takes the same paths (its arrays go through TensorStore's GCS
driver). Local paths are made absolute (Orbax wants absolute paths); URLs are kept exactly as given.

Object stores cannot append to or rename a file in place: `write_text` and `write_bytes` write whole files
(locally through a temporary file renamed over the target, so a reader never sees half a file).
"""

from __future__ import annotations

import os
import uuid

from etils import epath

# The schemes epath routes to a remote backend (fsspec or gfile); anything else is a local path.
URL_PREFIXES = ("gs://", "s3://", "az://", "hf://")


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names an object in a remote store (gs://, s3://, az://, hf://) rather than a local file."""
    return os.fspath(path).startswith(URL_PREFIXES)


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path: a URL unchanged, a local path made absolute (`~` expanded)."""
    if is_url(path):
        return epath.Path(os.fspath(path))
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def write_bytes(path: str | os.PathLike, data: bytes) -> epath.Path:
    """Writes the whole file `path` (its parent folder created); returns the path."""
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_url(path):  # an object appears when its upload completes: never half written
        path.write_bytes(data)
        return path
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def write_text(path: str | os.PathLike, text: str) -> epath.Path:
    """Writes the whole text file `path` (UTF-8; see `write_bytes`)."""
    return write_bytes(path, text.encode("utf-8"))
