"""GBNF grammars: the shipped ones (data/grammars/) and the ones users store (DATA_DIR/grammars/).

Every grammar is compiled by llama.cpp before it is stored or used, so a broken one is a 400
with the parser's own message, never a crash in the middle of a generation.
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
        """name -> "shipped" | "stored" (a stored grammar hides a shipped one of the same name)."""
        out = {f.stem: "shipped" for f in sorted(self.shipped_dir.glob("*.gbnf"))}
        out.update({f.stem: "stored" for f in sorted(self.user_dir.glob("*.gbnf"))})
        return out

    def get(self, name: str) -> str | None:
        if not NAME.match(name):
            return None
        for folder in (self.user_dir, self.shipped_dir):
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
        if not NAME.match(name):
            raise BadRequest("invalid_name", "grammar names are 1-64 letters, digits, '-' or '_'")
        self.validate(text)
        self.user_dir.mkdir(parents=True, exist_ok=True)
        target = self.user_dir / f"{name}.gbnf"
        existed = target.exists()
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(target)
        return existed

    def delete(self, name: str) -> bool:
        if not NAME.match(name):
            return False
        target = self.user_dir / f"{name}.gbnf"
        if target.exists():
            target.unlink()
            return True
        if (self.shipped_dir / f"{name}.gbnf").exists():
            raise BadRequest("read_only", f"{name} ships with the project and cannot be deleted", status=403)
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
