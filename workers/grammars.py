"""GBNF grammars: the shipped ones (data/grammars/) and the ones users store (DATA_DIR/grammars/).

Every grammar is compiled by llama.cpp before it is stored or used, so a broken one is a 400
with the parser's own message, never a crash in the middle of a generation. The shipped ones are read-only
and always win: a stored grammar can never take a shipped name, so `json` means the same on every worker.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

from .config import ROOT
from .protocol import BadRequest

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SHIPPED = ROOT / "data" / "grammars"


class GrammarStore:
    def __init__(self, user_dir: Path, check: Callable[[str], str | None], shipped_dir: Path = SHIPPED) -> None:
        self.user_dir = user_dir
        self.shipped_dir = shipped_dir
        self.check = check  # returns the parser's error message, or None when the grammar compiles
        self._valid: set[str] = set()  # sha256 of grammars already compiled once

    def names(self) -> dict[str, str]:
        """name -> "shipped" | "stored" (a stored file with a shipped name, left from older versions, is ignored)."""
        out = {f.stem: "stored" for f in sorted(self.user_dir.glob("*.gbnf"))}
        out.update({f.stem: "shipped" for f in sorted(self.shipped_dir.glob("*.gbnf"))})
        return out

    def shipped(self, name: str) -> bool:
        return bool(NAME.match(name)) and (self.shipped_dir / f"{name}.gbnf").is_file()

    def writable(self, name: str) -> None:
        """Raise the 400 (bad name) or 403 (shipped) that storing, replacing or deleting `name` would get."""
        if not NAME.match(name):
            raise BadRequest("invalid_name", "grammar names are 1-64 letters, digits, '-' or '_'")
        if self.shipped(name):
            raise BadRequest("read_only", f"{name} ships with the project and cannot be replaced or deleted; "
                             "store yours under another name", status=403)

    def get(self, name: str) -> str | None:
        if not NAME.match(name):
            return None
        for folder in (self.shipped_dir, self.user_dir):
            f = folder / f"{name}.gbnf"
            if f.is_file():
                return f.read_text()
        return None

    def validate(self, text: str) -> None:
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest in self._valid:
            return
        if not text.strip():
            raise BadRequest("invalid_grammar", "the grammar is empty")
        error = self.check(text)
        if error:
            raise BadRequest("invalid_grammar", f"llama.cpp could not parse the grammar: {error}")
        self._valid.add(digest)

    def put(self, name: str, text: str) -> bool:
        """Store (after compiling it); True if it replaced an existing stored grammar."""
        self.writable(name)
        self.validate(text)
        self.user_dir.mkdir(parents=True, exist_ok=True)
        target = self.user_dir / f"{name}.gbnf"
        existed = target.exists()
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(target)
        return existed

    def delete(self, name: str) -> bool:
        """True if a stored grammar was deleted, False if there was none; a shipped name raises the 403."""
        if not NAME.match(name):
            return False
        self.writable(name)
        target = self.user_dir / f"{name}.gbnf"
        if target.exists():
            target.unlink()
            return True
        return False

    def resolve(self, value: str) -> str:
        """`params.grammar`: a stored name or inline GBNF → the GBNF text, compiled once."""
        text = value if "::=" in value else self.get(value)
        if text is None:
            known = ", ".join(self.names()) or "none"
            raise BadRequest("unknown_grammar", f"no grammar named {value!r} (known: {known}); "
                             "send inline GBNF or store it with POST /grammars")
        self.validate(text)
        return text
