"""Files written without losing anything: atomic writes (a crash or a full disk leaves the old file
or the new one, never half of one), and the checks before any work that an output can be written
and destroys no input. Standard library only.
"""

import contextlib
import errno
import os
import shutil
import tempfile

# what torch.save's zip writer says when a write fails under it (a full disk, an I/O error)
TORCH_WRITE_FAILED = ("inline_container", "PytorchStreamWriter", "file write failed", "iostream error")


class WriteFailed(OSError):
    """An atomic write that failed (a full disk, a folder gone read-only): the file that was there
    before, if any, is whole. Commands turn it into one sentence (str of it)."""

    def __str__(self):
        return f"cannot write '{self.filename}' ({self.strerror}); the file there before, if any, is unchanged"


def write_atomically(path, write):
    """write(temp path), then rename it over `path`: a crash leaves the old file or the new one,
    never half of one. Temp files of writers that died mid-write (kill -9) are removed first."""
    path = os.path.abspath(path)
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):
        pid = f[len(name) + 4:]
        if f.startswith(name + ".tmp") and pid.isdigit() and int(pid) != os.getpid() \
                and not process_alive(int(pid)):
            os.remove(os.path.join(folder, f))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except RuntimeError as e:
        # torch's zip writer raises RuntimeError, not OSError, when the disk fills under it
        full = shutil.disk_usage(folder).free < 1 << 20
        if not full and not any(mark in str(e) for mark in TORCH_WRITE_FAILED):
            raise
        raise WriteFailed(errno.ENOSPC if full else errno.EIO,
                          "No space left on device" if full else f"the write failed ({e})", path) from None
    except OSError as e:  # named by the file the user asked for, not by the temp file
        raise WriteFailed(e.errno, e.strerror or str(e), path) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    """A text file written atomically, its write errors raised before the rename (a full disk
    leaves the old file, not an empty one)."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    write_atomically(path, write)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def check_output_path(path, extensions, flag, overwrite=True, inputs=()):
    """Before any work, that `path` can be written and nothing is lost by writing it: a
    ValueError with a sentence if its extension is not one of `extensions`, it is a folder or one
    of the `inputs`, it exists and overwrite is False, or its folder cannot be written."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} '{path}' is a folder; give a file name")
    if os.path.splitext(path)[1].lower() not in extensions:
        raise ValueError(f"{flag} '{path}': the name must end in {', '.join(extensions)}")
    if os.path.exists(path):
        if any(os.path.exists(p) and os.path.samefile(path, p) for p in inputs):
            raise ValueError(f"{flag} '{path}' is the input file; writing it would destroy the input")
        if not overwrite:
            raise ValueError(f"{flag} '{path}' exists; pass --overwrite to replace it")
    check_writable_folder(os.path.dirname(os.path.abspath(path)), flag)


def missing_folders(folder):
    """The folders that making `folder` would create, deepest first ([] if it exists)."""
    missing, folder = [], os.path.abspath(folder)
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def remove_empty(folders):
    """Remove each folder that is empty (deepest first, as missing_folders lists them)."""
    for folder in folders:
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def check_writable_folder(folder, flag):
    """Create the folder and a file in it, as the real write will; a sentence if that fails."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{flag}: cannot write in '{folder}', which is a file, not a folder")
    created = missing_folders(folder)  # made for the test and removed after it, so that a run
    try:                                # refused later leaves no empty folders behind
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"{flag}: cannot write in '{folder}' ({e.strerror or e})") from None
    finally:
        remove_empty(created)
