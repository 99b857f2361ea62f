"""Where results live: a local directory or an object-store URI (s3://, gs://, any filesystem
pyarrow resolves), read and written through pyarrow filesystems."""
from __future__ import annotations

from pathlib import Path

from .errors import MissingInputError
from .schema import ConfigError


def is_uri(path: str) -> bool:
    """Whether ``path`` names object storage (``s3://``, ``gs://``, ...) rather than a local path."""
    return "://" in str(path) and not str(path).startswith("file://")


def absolute_storage(path: str) -> str:
    """Ray needs absolute storage paths; URIs (s3://, gs://) pass through."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def check_no_credentials(key: str, uri: str) -> None:
    """Refuse ``scheme://user:secret@host/...``: checkpoints, logs and Tune's files record the
    value. The message does not echo it."""
    if "://" in uri and "@" in uri.split("://", 1)[1].split("/", 1)[0]:
        raise ConfigError(f"{key}: a {uri.split('://', 1)[0]}:// URI must not carry credentials (user:secret@); "
                          "give them through the environment or the machine's role instead")


def storage_error(err: OSError, uri: str) -> str:
    """Why a storage call on ``uri`` failed, in a few words (missing bucket, credentials, or the
    first line of pyarrow's message)."""
    text = str(err)
    if "NoSuchBucket" in text or "NOT_FOUND" in text:
        return f"bucket {uri.split('://', 1)[-1].split('/', 1)[0]!r} does not exist"
    if "ACCESS_DENIED" in text or "AccessDenied" in text or "403" in text:
        return ("access denied (no or wrong credentials: give them through AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY, a profile or the machine's role)")
    return text.splitlines()[0] if text else type(err).__name__


def to_uri(storage: str, fs_path: str) -> str:
    """The URI (or local path) of ``fs_path``, a path inside the filesystem of ``storage``."""
    return f"{storage.split('://', 1)[0]}://{fs_path}" if is_uri(storage) else fs_path


def fetch_dir(uri_or_path: str, local: str) -> str:
    """A local directory with the contents of ``uri_or_path``: itself when local, else copied into ``local``."""
    import pyarrow.fs

    if not is_uri(uri_or_path):
        return uri_or_path
    fs, path = filesystem(uri_or_path)
    info = fs.get_file_info(path)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise MissingInputError(f"{uri_or_path} does not exist")
    if info.type == pyarrow.fs.FileType.File:
        target = f"{local}/{info.base_name}"
        pyarrow.fs.copy_files(path, target, source_filesystem=fs)
        return target
    copy_dir(path, local, source_fs=fs)
    return local


def filesystem(uri_or_path: str):
    """(pyarrow filesystem, path inside it) for a local path or an s3:// gs:// ... URI."""
    import pyarrow.fs

    if "://" in uri_or_path:
        return pyarrow.fs.FileSystem.from_uri(uri_or_path)
    return pyarrow.fs.LocalFileSystem(), uri_or_path


def is_local(fs) -> bool:
    import pyarrow.fs

    return isinstance(fs, pyarrow.fs.LocalFileSystem)


def exists(fs, path: str) -> bool:
    import pyarrow.fs

    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def subdirectories(fs, path: str) -> list[str]:
    """Paths of the directories directly inside ``path``."""
    import pyarrow.fs

    return [info.path for info in fs.get_file_info(pyarrow.fs.FileSelector(path))
            if info.type == pyarrow.fs.FileType.Directory]


def write_text(fs, path: str, text: str) -> None:
    """Write ``text`` to a temporary name, then move it over ``path``."""
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path + ".tmp") as stream:
        stream.write(text.encode())
    fs.move(path + ".tmp", path)


def read_text(fs, path: str) -> str:
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def copy_dir(source: str, destination: str, *, source_fs=None, destination_fs=None) -> None:
    """Copy a directory tree between filesystems (local <-> object storage)."""
    import pyarrow.fs

    pyarrow.fs.copy_files(source, destination, source_filesystem=source_fs, destination_filesystem=destination_fs)
