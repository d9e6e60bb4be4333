"""Files shipped with preforkd besides its code: the commented example configuration
(``etc/preforkd.toml`` in the source tree) and the systemd units (``systemd/``).

There is one copy of each, in the source tree. ``pyproject.toml`` maps ``etc/`` and
``systemd/`` into the wheel as ``preforkd/_etc/`` and ``preforkd/_systemd/``, so
``preforkd sample-config`` prints them from a plain ``pip install``; run from a
checkout (``pip install -e``), it reads the source tree's files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Tuple

if TYPE_CHECKING:  # imported when used: every start of preforkd imports this module
    from pathlib import Path

#: The names ``preforkd sample-config`` accepts, the default first.
SAMPLE_FILES: Tuple[str, ...] = ("preforkd.toml", "preforkd.service", "preforkd.socket")
#: name -> directory in the source tree (``_`` + it inside the installed package).
_DIRECTORY: Dict[str, str] = {"preforkd.toml": "etc", "preforkd.service": "systemd", "preforkd.socket": "systemd"}


def shipped_path(name: str) -> Path:
    """Where the shipped file *name* (one of :data:`SAMPLE_FILES`) is: inside the
    installed package (a wheel), else in the source tree this module runs from.

    :raises KeyError: for another name.
    :raises FileNotFoundError: when neither has it (a broken installation).
    """
    from importlib import resources
    from pathlib import Path

    directory = _DIRECTORY[name]
    installed = resources.files("preforkd").joinpath(f"_{directory}").joinpath(name)
    if installed.is_file():
        return Path(str(installed))
    source = Path(__file__).resolve().parent.parent.parent / directory / name
    if source.is_file():
        return source
    raise FileNotFoundError(f"{name} is not installed with preforkd (looked in {installed} and {source})")


def read_shipped(name: str) -> str:
    """The text of the shipped file *name* (see :func:`shipped_path`).

    :raises KeyError: for another name.
    :raises OSError: when it cannot be read.
    """
    return shipped_path(name).read_text(encoding="utf-8")
