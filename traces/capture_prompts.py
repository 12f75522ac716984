"""Prompts for real-model runs (capture and fidelity): the JSONL prompt file, and checking an answer.

A prompt file holds one JSON object per line, {"prompt": str, "id"?: str|int, "answer"?: number};
with an answer, a completion is right when its final number (after the last "answer is", else the
last number in the text) equals it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tiersim.errors import TiersimError

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_ANSWER_IS = re.compile(r"answer\s+is\s*[:=]?\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Prompt:
    """One prompt: its text, an id, and optionally the numeric answer to check the completion against."""

    text: str
    id: str = ""
    answer: float | None = None


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Read a JSONL file of {"prompt": str, "id"?: str|int, "answer"?: number}, one per line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TiersimError(f"{path}: no such prompts file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TiersimError(f"{path}: cannot read prompts ({e})") from None
    prompts = [_parse_line(line, f"{path}:{lineno}", lineno) for lineno, line in enumerate(lines, 1) if line.strip()]
    if not prompts:
        raise TiersimError(f"{path}: no prompts (the file is empty); expected one JSON object per line")
    seen: set[str] = set()
    for p in prompts:
        if p.id in seen:
            raise TiersimError(f"{path}: prompt id {p.id!r} appears twice; ids must be unique")
        seen.add(p.id)
    return prompts


def _parse_line(line: str, where: str, lineno: int) -> Prompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise TiersimError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); each line must be one"
                           ' JSON object like {"id": "p1", "prompt": "...", "answer": 42}') from None
    if not isinstance(record, dict):
        raise TiersimError(f"{where}: a {type(record).__name__}, expected a JSON object with a \"prompt\"")
    text = record.get("prompt")
    if not isinstance(text, str) or not text.strip():
        raise TiersimError(f"{where}: \"prompt\" missing or not a non-empty string")
    pid = record.get("id", f"line-{lineno}")
    if isinstance(pid, bool) or not isinstance(pid, (str, int)):
        raise TiersimError(f"{where}: \"id\" must be a string or an integer, got {pid!r}")
    answer = record.get("answer")
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (int, float))):
        raise TiersimError(f"{where}: \"answer\" must be a number, got {answer!r}")
    return Prompt(text, str(pid), None if answer is None else float(answer))


def as_prompts(prompts: str | os.PathLike | Sequence[Prompt | str]) -> list[Prompt]:
    """A prompt file's prompts, or a list of Prompt or plain strings (ids 0, 1, ...), checked non-empty."""
    if isinstance(prompts, (str, os.PathLike)):
        return read_prompts(prompts)
    out = [p if isinstance(p, Prompt) else Prompt(str(p), str(i)) for i, p in enumerate(prompts)]
    if not out:
        raise TiersimError("no prompts given")
    if any(not p.text.strip() for p in out):
        raise TiersimError("a prompt is empty")
    return out


def extract_answer(text: str) -> float | None:
    """The number after the last "answer is", else the last number in the text, else None."""
    found = _ANSWER_IS.findall(text)
    candidates = found if found else _NUMBER.findall(text)
    for raw in reversed(candidates):
        try:
            return float(raw.replace(",", ""))
        except ValueError:
            continue
    return None


def answer_correct(text: str, answer: float | None) -> tuple[float | None, bool | None]:
    """(the number extract_answer finds in `text`, whether it equals `answer`); (…, None) without an answer."""
    got = extract_answer(text)
    if answer is None:
        return got, None
    return got, got is not None and math.isclose(got, answer, rel_tol=1e-9, abs_tol=1e-9)
