"""GBNF grammars: the shipped ones (data/grammars/) and the ones users store (DATA_DIR/grammars/).

The two never share a folder. With the default DATA_DIR (the checkout's data/), DATA_DIR/grammars/ *is* the
shipped folder, and storing there wrote into the checkout: a stored grammar then counted as shipped and could be
neither replaced nor deleted. So when the folder a store is given is the shipped one, it keeps its grammars in
the sibling grammars-user/ instead (data/grammars-user/ in a checkout); any other DATA_DIR is unchanged.

Every grammar is measured against the request limits (size, nesting) and then compiled by llama.cpp before it is
stored or used, so a broken or hostile one is a 400 with a reason, never a crash in the middle of a generation.
Compiling runs in a thread: a big grammar takes seconds, and the event loop keeps answering health and acks.
The shipped ones are read-only and always win: a stored grammar can never take a shipped name, so `json` means the
same on every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import re
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from .config import ROOT
from .protocol import BadRequest, Limits, gbnf_problem

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SHIPPED = ROOT / "data" / "grammars"
APART = "grammars-user"  # where stored grammars go when the folder given for them is the shipped one
REMEMBERED = 1024  # digests of grammars that compiled: inline grammars are many, memory is not
DEFAULT_LIMITS = Limits()  # tests; a worker passes its settings.limits
NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS}  # the disk, not the request, is at fault


def user_folder(user_dir: Path, shipped_dir: Path = SHIPPED) -> Path:
    """Where stored grammars go: `user_dir`, unless that is the shipped folder (default DATA_DIR), then its
    sibling grammars-user/, so a write or delete can never reach a shipped file."""
    if user_dir.resolve() == shipped_dir.resolve():
        return user_dir.parent / APART
    return user_dir


class GrammarStore:
    def __init__(self, user_dir: Path, check: Callable[[str], str | None], shipped_dir: Path = SHIPPED,
                 limits: Limits = DEFAULT_LIMITS) -> None:
        self.user_dir = user_folder(user_dir, shipped_dir)
        self.shipped_dir = shipped_dir
        self.check = check  # returns the parser's error message, or None when the grammar compiles
        self.limits = limits
        self._valid: OrderedDict[str, None] = OrderedDict()  # sha256 of grammars already compiled once

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
                return f.read_text(encoding="utf-8")
        return None

    async def validate(self, text: str) -> None:
        """400 `invalid_grammar` unless the grammar is within the limits and llama.cpp compiles it."""
        try:
            digest = hashlib.sha256(text.encode()).hexdigest()
        except UnicodeEncodeError:
            raise BadRequest("invalid_grammar", "the grammar holds a lone UTF-16 surrogate (such as \\ud800), "
                             "which is not text; send valid Unicode") from None
        if digest in self._valid:
            self._valid.move_to_end(digest)
            return
        if not text.strip():
            raise BadRequest("invalid_grammar", "the grammar is empty")
        # Before llama.cpp sees it: its parser recurses per nested group and crashes the process on deep ones.
        if (problem := gbnf_problem(text, self.limits)) is not None:
            raise BadRequest("invalid_grammar", problem)
        error = await asyncio.to_thread(self.check, text)
        if error:
            raise BadRequest("invalid_grammar", f"llama.cpp could not parse the grammar: {error}")
        self._valid[digest] = None
        while len(self._valid) > REMEMBERED:
            self._valid.popitem(last=False)

    async def put(self, name: str, text: str) -> bool:
        """Store (after compiling it); True if it replaced an existing stored grammar. A full or read-only disk
        is a 507 and leaves no partial file."""
        self.writable(name)
        await self.validate(text)
        return await asyncio.to_thread(self._write, name, text)

    def _write(self, name: str, text: str) -> bool:
        target = self.user_dir / f"{name}.gbnf"
        tmp: str | None = None
        try:
            self.user_dir.mkdir(parents=True, exist_ok=True)
            existed = target.exists()
            fd, tmp = tempfile.mkstemp(dir=self.user_dir, prefix=f".{name}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, target)
            return existed
        except OSError as e:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            if e.errno in NO_SPACE:
                raise BadRequest("insufficient_storage", f"grammar {name} was not stored: {os.strerror(e.errno)} "
                                 f"in {self.user_dir}; free space there (or delete unused grammars) and try again",
                                 status=507) from None
            raise

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

    async def resolve(self, value: str) -> str:
        """`params.grammar`: a stored name or inline GBNF → the GBNF text, compiled once."""
        text = value if "::=" in value else self.get(value)
        if text is None:
            names = list(self.names())
            known = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "") or "none"
            raise BadRequest("unknown_grammar", f"no grammar named {value!r} (known: {known}); "
                             "send inline GBNF or store it with POST /grammars")
        await self.validate(text)
        return text
