"""An offline stand-in for Google Cloud Storage: `gs://<bucket>/<key>` kept in a local folder `<root>/<bucket>/<key>`.

etils.epath sends every gs:// path to fsspec's "gcs" filesystem (gcsfs in production). `install` registers in its
place a filesystem that stores the objects under `root` and, like an object store, refuses to append to a file.
crrf_jax's own reads and writes then take exactly the code path they take on GCS (epath -> fsspec) without a
network; a stray `os.*` or `open()` on a gs:// path would instead create a local folder named `gs:`.

Orbax is the exception: its arrays go through TensorStore's native GCS driver (HTTP to storage.googleapis.com),
and on gs:// it also asks google-cloud-storage whether the bucket has a hierarchical namespace, neither of which
can run offline. `orbax_in_folder` therefore hands Orbax the local folder behind each gs:// path (the same place
the fake bucket keeps its objects), so checkpoints and final weights land beside everything else and are read
back through gs:// paths by crrf_jax (DONE markers, `is_dir` checks) -- but Orbax's own GCS code path (commit
files instead of renames, TensorStore's gcs driver) is not exercised.

`python -m tests.helpers.train_hooks` installs both when CRRF_TEST_FAKE_GCS=<root> is set.
"""

from __future__ import annotations

import contextlib
import os

from fsspec.implementations.local import LocalFileSystem

PREFIXES = ("gs://", "gcs://")


class BucketFolderFileSystem(LocalFileSystem):
    """fsspec's local filesystem with gs:// names mapped into `root` and no appending."""

    protocol = ("gs", "gcs")
    root = ""  # set by `filesystem_class`

    def __init__(self, *args, **storage_options):
        storage_options.pop("finalize_on_close", None)  # gcsfs's option, passed by epath
        super().__init__(auto_mkdir=True)

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = os.fspath(path)
        for prefix in PREFIXES:
            if path.startswith(prefix):
                return os.path.join(cls.root, path.removeprefix(prefix)).rstrip("/")
        if path.startswith(cls.root):  # fsspec passes names it has already mapped
            return path
        raise ValueError(f"fake GCS: {path!r} is not a gs:// path")

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise OSError(f"fake GCS: {path}: object stores cannot append (mode {mode!r})")
        return super()._open(path, mode, **kwargs)


def filesystem_class(root: str | os.PathLike) -> type[BucketFolderFileSystem]:
    return type("FakeGCS", (BucketFolderFileSystem,), {"root": os.path.abspath(root)})


def local_path(path, root: str | os.PathLike) -> str:
    """The folder behind gs://<bucket>/<key>: `<root>/<bucket>/<key>` (other paths unchanged)."""
    path = os.fspath(path)
    for prefix in PREFIXES:
        if path.startswith(prefix):
            return os.path.join(os.path.abspath(root), path.removeprefix(prefix))
    return path


@contextlib.contextmanager
def installed(root: str | os.PathLike):
    """gs:// served from `root` for etils.epath (through fsspec) while the context lasts."""
    install(root)
    try:
        yield
    finally:
        uninstall()


def install(root: str | os.PathLike) -> None:
    import fsspec
    from etils.epath import backend

    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, filesystem_class(root), clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()


def uninstall() -> None:
    from etils.epath import backend
    from fsspec.registry import _registry  # what register_implementation fills

    for name in ("gs", "gcs"):
        _registry.pop(name, None)
    backend.fsspec_backend._get_filesystem.cache_clear()


def orbax_in_folder(root: str | os.PathLike, setattr_=setattr) -> None:
    """Orbax's CheckpointManager and StandardCheckpointer given the local folder behind a gs:// path.

    setattr_: how to replace the methods (pytest's monkeypatch.setattr to undo it after a test).
    """
    import orbax.checkpoint as ocp
    from etils import epath

    def local(path):
        return epath.Path(local_path(path, root))

    manager_init = ocp.CheckpointManager.__init__

    def init(self, directory, *args, **kwargs):
        manager_init(self, local(directory), *args, **kwargs)

    save, restore = ocp.StandardCheckpointer.save, ocp.StandardCheckpointer.restore
    setattr_(ocp.CheckpointManager, "__init__", init)
    setattr_(ocp.StandardCheckpointer, "save", lambda self, directory, *a, **k: save(self, local(directory), *a, **k))
    setattr_(ocp.StandardCheckpointer, "restore",
             lambda self, directory, *a, **k: restore(self, local(directory), *a, **k))
