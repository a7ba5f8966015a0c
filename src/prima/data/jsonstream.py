"""Read big JSON files piece by piece: the elements of a list, or the items of an object, one at a time.

M4Seg ships as one JSON list of ~744K records, and PACO-LVIS's annotation file is a single object of
several hundred MB; ``json.load`` would hold either whole in memory several times over. ``JsonStream``
parses one value at a time with the standard library's ``JSONDecoder.raw_decode`` from a buffer holding
the next chunk of the file; when a value runs past the buffer's end, the next chunk is appended and the
value parsed again. Memory is bounded by the largest single value read plus one chunk, and no package
beyond the standard library is needed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from prima.errors import PrimaError

_WHITESPACE = " \t\r\n"


class JsonStream:
    """A cursor over a JSON text file: ``peek``/``take`` punctuation, parse ``value``s, walk ``array``s.

    A syntax error can't be skipped (the parser can't resynchronise), so it raises a PrimaError naming
    the file, what was being read and the character offset; so does a single value longer than
    ``max_value_chars``, which keeps a broken file from being read whole into the buffer while the
    parser waits for the end of a value that never comes.
    """

    def __init__(self, f: TextIO, *, path: Path, chunk_chars: int = 1 << 20, max_value_chars: int = 1 << 26):
        self.f, self.path = f, path
        self.chunk_chars, self.max_value_chars = chunk_chars, max_value_chars
        self.decoder = json.JSONDecoder()
        self.buf, self.pos, self.consumed, self.eof = "", 0, 0, False

    def _more(self) -> bool:
        if self.eof:
            return False
        try:
            chunk = self.f.read(max(self.chunk_chars, len(self.buf) - self.pos))  # grow reads for long values
        except UnicodeDecodeError as e:
            raise PrimaError(f"{self.path}: not UTF-8 text near byte {e.start} of a chunk ({e.reason})") from None
        if not chunk:
            self.eof = True
            return False
        self.consumed += self.pos
        self.buf, self.pos = self.buf[self.pos :] + chunk, 0
        return True

    def offset(self) -> int:
        """Characters of the file before the cursor."""
        return self.consumed + self.pos

    def peek(self) -> str:
        """The next non-whitespace character, not consumed; ``""`` at the end of the file."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return ""

    def take(self, expected: str, what: str) -> None:
        found = self.peek()
        if found != expected:
            raise PrimaError(
                f"{self.path}: expected {expected!r} {what} near character {self.offset()}, "
                f"got {found or 'end of file'!r}"
            )
        self.pos += 1

    def value(self, what: str) -> Any:
        """Parse the next JSON value, reading more of the file while it is incomplete."""
        if not self.peek():
            raise PrimaError(f"{self.path}: the file ends early, before {what}")
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof:  # a number at the buffer's end may go on in the next chunk
                    self.pos = end
                    return value
            except json.JSONDecodeError as e:
                if self.eof or len(self.buf) - self.pos > self.max_value_chars:
                    longer = "" if self.eof else f" (or it is longer than {self.max_value_chars} characters)"
                    raise PrimaError(
                        f"{self.path}: invalid JSON in {what} near character {self.consumed + e.pos}: {e.msg}{longer}"
                    ) from None
            self._more()  # at the end of the file the next pass returns the value or reports the error

    def array(self, what: str) -> Iterator[Any]:
        """The elements of the JSON list at the cursor, one by one (``what`` names them in errors)."""
        self.take("[", f"(a list of {what})")
        if self.peek() == "]":
            self.pos += 1
            return
        index = 0
        while True:
            yield self.value(f"{what} {index}")
            index += 1
            if self.peek() == "]":
                self.pos += 1
                return
            self.take(",", f"after {what} {index - 1}")

    def object_items(self, what: str) -> Iterator[tuple[str, JsonStream]]:
        """``(key, self)`` for each key of the JSON object at the cursor; the caller reads its value.

        The caller must consume the value (``value()`` or ``array()``) before taking the next item.
        """
        self.take("{", f"(the start of {what})")
        if self.peek() == "}":
            self.pos += 1
            return
        while True:
            key = self.value(f"a key of {what}")
            if not isinstance(key, str):
                raise PrimaError(f"{self.path}: expected a string key in {what} near character {self.offset()}")
            self.take(":", f"after key {key!r}")
            yield key, self
            if self.peek() == "}":
                self.pos += 1
                return
            self.take(",", f"after the value of {key!r}")


def iter_json_array(
    f: TextIO, *, path: Path, chunk_chars: int = 1 << 20, max_record_chars: int = 1 << 26
) -> Iterator[Any]:
    """The records of a file holding one JSON list, one at a time (errors name the record index)."""
    stream = JsonStream(f, path=path, chunk_chars=chunk_chars, max_value_chars=max_record_chars)
    yield from stream.array("record")
    if stream.peek():
        raise PrimaError(f"{path}: unexpected data after the JSON list near character {stream.offset()}")
