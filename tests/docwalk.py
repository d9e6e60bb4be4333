"""Read the shell examples of a Markdown page the way a newcomer pastes them.

A ```` ```sh ```` block is either a transcript (lines starting with ``$ `` are commands,
the lines after one are what it prints) or a list of commands (every line is one).
A trailing ``\\`` continues a command on the next line; ``# text`` after a command is
its comment. The walk tests (test_readme.py, test_systemd_real.py) run these commands
in order and fail on any command they do not know how to run, so a page that gains a
command gains a step in its walk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List


@dataclass
class Command:
    """One pasted command: its text (continuations joined, comment removed), its comment,
    the heading it is under, and the lines a transcript shows it printing."""

    text: str
    comment: str
    section: str
    output: List[str] = field(default_factory=list)

    def quoted(self) -> List[str]:
        """Strings in double quotes in the comment: what the page says the output shows."""
        return re.findall(r'"([^"]+)"', self.comment)


def _split_comment(line: str) -> List[str]:
    """``cmd  # comment`` -> [cmd, comment]; a ``#`` inside quotes is kept."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return [line[:i].rstrip(), line[i + 1:].strip()]
    return [line.rstrip(), ""]


def commands(page: Path) -> List[Command]:
    """Every command of every ```` ```sh ```` block of *page*, in order."""
    out: List[Command] = []
    section = ""
    block: List[str] = []
    fenced = inside = False
    for line in page.read_text().splitlines():
        if not fenced and line.startswith("#"):
            section = line.lstrip("#").strip()
        if line.startswith("```"):
            if inside:
                out += _block(block, section)
                block, inside = [], False
            fenced = not fenced
            inside = fenced and line.strip() == "```sh"
            continue
        if inside:
            block.append(line)
    return out


def _block(lines: List[str], section: str) -> List[Command]:
    transcript = any(ln.startswith("$ ") for ln in lines)
    out: List[Command] = []
    pending = ""
    for line in lines:
        if transcript and not line.startswith("$ ") and not pending:
            if out and line.strip():
                out[-1].output.append(line)
            continue
        if transcript and line.startswith("$ "):
            line = line[2:]
        if not line.strip() or (not pending and line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1].rstrip() + " "
            continue
        text, comment = _split_comment(pending + line.strip())
        pending = ""
        out.append(Command(text=" ".join(text.split()), comment=comment, section=section))
    return out
