"""Find the Inception-v3 weights on disk, never over the network.  Torch-free.

The standard FID network is Inception-v3 with the TensorFlow weights of 2015-12-05.  Each
backend reads its own conversion of them, from its own file:

================  ==============================================  ===============================
backend           file                                            the library's usual location
================  ==============================================  ===============================
torch-fidelity    ``weights-inception-2015-12-05-6726825d.pth``   ``$TORCH_HOME/hub/checkpoints/``
                  (a state_dict; ``inception-v3-compat``)         (``~/.cache/torch/hub/...``)
clean-fid         ``inception-2015-12-05.pt`` (TorchScript,       ``/tmp/`` (``./`` on Windows)
                  NVlabs' metrics network)
================  ==============================================  ===============================

``eval.inception_weights`` may name the file itself or a folder holding it; it is looked at
first.  When the file is nowhere, :func:`locate_inception_weights` raises one
:class:`~benchmark.schema.UserError` naming the file, the URL to fetch it from on a machine
with internet, and the folder to put it in.  We check before the libraries are called, so
neither ever starts a download (which would hang or fail on an offline node).

The planner calls :func:`extractor_weights_identity` so that an evaluation key changes
with the weights' bytes (a test's random weights never share a key with the real ones).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from benchmark.schema import UserError


@dataclass(frozen=True)
class InceptionFile:
    filename: str
    url: str
    what: str  # the file's format, in words


INCEPTION_FILES = {
    "torch-fidelity": InceptionFile(
        "weights-inception-2015-12-05-6726825d.pth",
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
        "weights-inception-2015-12-05-6726825d.pth",
        "torch-fidelity's inception-v3-compat state_dict"),
    "clean-fid": InceptionFile(
        "inception-2015-12-05.pt",
        "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
        "inception-2015-12-05.pt",
        "clean-fid's TorchScript Inception (NVlabs' metrics network)"),
}


def torch_hub_checkpoints() -> Path:
    """torch.hub's checkpoint folder, resolved as torch does, without importing torch."""
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "torch")
    return Path(home).expanduser() / "hub" / "checkpoints"


def default_locations(backend: str) -> list[Path]:
    """Folders each library looks in for its file (clean-fid hard-codes /tmp on Linux)."""
    if backend == "torch-fidelity":
        return [torch_hub_checkpoints()]
    return [Path("./" if platform.system() == "Windows" else "/tmp"), torch_hub_checkpoints()]


def locate_inception_weights(backend: str, configured: str = "") -> Path:
    """The weights file ``backend`` needs: ``configured`` (a file or a folder) first, then
    the library's usual locations.  Raises UserError (one line) when it is nowhere."""
    if backend not in INCEPTION_FILES:
        raise UserError(f"eval.backend={backend!r} is unknown; expected one of: "
                        f"{', '.join(INCEPTION_FILES)}")
    spec = INCEPTION_FILES[backend]
    if configured:
        path = Path(configured).expanduser()
        if path.is_file() and backend == "clean-fid" and path.name != spec.filename:
            # clean-fid opens <folder>/inception-2015-12-05.pt by that fixed name
            raise UserError(f"eval.inception_weights={configured!r} is named {path.name}; expected "
                            f"clean-fid's file to be named {spec.filename}: rename it or pass its folder")
        if path.is_file():
            return path.resolve()
        if not path.is_dir():
            raise UserError(f"eval.inception_weights={configured!r} does not exist; expected "
                            f"{spec.filename} ({spec.what}) or a folder holding it")
        candidates = [path]
    else:
        candidates = default_locations(backend)
    for folder in candidates:
        if (folder / spec.filename).is_file():
            return (folder / spec.filename).resolve()
    where = ", ".join(str(c) for c in candidates)
    raise UserError(
        f"Inception weights for eval.backend={backend} not found: {spec.filename} is in none "
        f"of: {where}; expected {spec.what}: on a machine with internet fetch {spec.url} and put "
        f"it in {candidates[0]}/ (or pass eval.inception_weights=<file>), or use "
        f"eval.extractor=pixels for a weight-free smoke test")


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, memoised per (path, size, mtime) within a process."""
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def extractor_weights_identity(extractor: str, backend: str, configured: str = "") -> str:
    """What names the feature network's weights in evaluation keys: the Inception file's
    sha256 (16 hex), the digits classifier's recipe id, or ``"none"`` for pixels."""
    if extractor == "inception-v3":
        return file_digest(locate_inception_weights(backend, configured))[:16]
    if extractor == "digits":
        from benchmark.metrics import FEATURE_EXTRACTOR_ID

        return FEATURE_EXTRACTOR_ID
    return "none"
