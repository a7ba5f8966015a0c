"""User-facing errors: the CLI prints these as one line instead of a traceback."""

from __future__ import annotations


class PrimaError(Exception):
    """An error caused by the user's input or environment, with a message written for people."""


class SampleError(PrimaError, ValueError):
    """A sample (or prediction) that breaks the JSONL format; the message names file, line, id and field."""

    def __init__(self, message: str, *, path=None, line=None, sample_id=None, field=None):
        where = []
        if path is not None:
            where.append(f"{path}" + (f":{line}" if line is not None else ""))
        elif line is not None:
            where.append(f"line {line}")
        if sample_id is not None:
            where.append(f"sample {sample_id!r}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.path, self.line, self.sample_id, self.field = path, line, sample_id, field
