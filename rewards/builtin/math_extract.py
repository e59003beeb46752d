"""Finding the final answer in a completion (the ``extract`` methods of the ``math`` reward).

Methods, tried in the configured order; the first that finds something wins:
  boxed        (unless a "final answer is ..." follows the last box: then ``prose``)
               the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces allowed); boxes just before it,
               joined only by separators (``,`` ``;`` ``and`` ``or`` ``\\quad`` a short ``\\text{}`` or
               a few words, none of them "but / then / wait / not ..."), are read with it as one list:
               ``\\boxed{-2} and \\boxed{1}`` -> ``-2, 1``
  answer_tag   the last ``<answer>...</answer>`` (a ``\\boxed{}`` inside it wins)
  hash         the text after the last ``####`` on its line (GSM8K style)
  prose        the last math span (``$..$``, ``$$..$$``, ``\\(..\\)``, ``\\[..\\]``) or number standing
               alone, whichever comes last, in the sentence after the last "final answer is" /
               "answer is" / "answer:" when there is one, else in the last 4,000 characters
  last_number  the last number standing alone (``-1,234.5``, ``3/4``, ``12cm``; not the ``2`` of
               ``AZYUK2A`` nor the ``7`` of ``x_7b``)
Everything here is string scanning in linear time; nothing is evaluated.
"""

from __future__ import annotations

import re

from rewards.builtin.math_rules import UNITS

METHODS = ("boxed", "answer_tag", "hash", "prose", "last_number")
_BOXED = re.compile(r"\\(?:boxed|fbox)")
_HASH = re.compile(r"####[ \t]*([^\n]*)")
_NUMBER = re.compile(r"(?<![A-Za-z0-9._])-?(?:[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?|[0-9]+(?:\.[0-9]+)?|\.[0-9]+)"
                     r"(?:\s*/\s*[0-9]+)?(?![0-9])")
# what may stand between two boxes that form one list answer
_JOIN_WORD = re.compile(r"[A-Za-z]+")
_JOIN_STOP = {"but", "then", "wait", "actually", "instead", "not", "no", "however", "correct", "wrong",
              "answer", "final", "check", "so", "hence", "therefore", "thus"}
_ANCHOR = re.compile(r"(?:final answer is|answer is|answer:)", re.I)
_SPAN = re.compile(r"\$\$(.+?)\$\$|(?<!\\)\$(.+?)(?<!\\)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.S)


def _matching_braces(text: str) -> dict[int, int]:
    """Position of each '{' -> position of its '}' (unmatched ones absent); one pass, O(n)."""
    stack: list[int] = []
    match: dict[int, int] = {}
    for j, c in enumerate(text):
        if c == "{":
            stack.append(j)
        elif c == "}" and stack:
            match[stack.pop()] = j
    return match


def boxes(text: str) -> list[tuple[int, int, str]]:
    """Every well-formed box as (start of ``\\boxed``, end after its ``}``, content), in order."""
    starts = [(m.start(), m.end()) for m in _BOXED.finditer(text)]
    if not starts:
        return []
    match = _matching_braces(text) if "{" in text else {}
    out = []
    for s, e in starts:
        i = e
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            if i in match:
                out.append((s, match[i] + 1, text[i + 1:match[i]]))
            continue                      # unbalanced: skip it
        m = re.match(r"[^\s$]+", text[i:i + 200])   # \boxed 5
        if m and not m.group(0).startswith("\\"):
            out.append((s, i + m.end(), m.group(0)))
    return out


def _joins(between: str) -> bool:
    """Whether the text between two boxes only separates items of one list answer."""
    if len(between) > 40 or re.search(r"[0-9=]", between):
        return False
    words = {w.lower() for w in _JOIN_WORD.findall(re.sub(r"\\[A-Za-z]+", " ", between))}
    return len(words) <= 4 and not words & _JOIN_STOP


def _boxed(text: str) -> str | None:
    found = boxes(text)
    if not found:
        return None
    group = [found[-1]]
    for prev in reversed(found[:-1]):
        if not _joins(text[prev[1]:group[0][0]]):
            break
        group.insert(0, prev)
    items = [c.strip() for _, _, c in group if c.strip()]
    return ", ".join(items) if items else None


def blocks(text: str, open_tag: str, close_tag: str) -> list[str]:
    """Contents of every ``open_tag ... close_tag`` (non-nested, first close wins), in linear time
    (a regex ``(.*?)`` rescans to the end for every unclosed tag)."""
    out, pos = [], 0
    while True:
        a = text.find(open_tag, pos)
        if a < 0:
            return out
        b = text.find(close_tag, a + len(open_tag))
        if b < 0:
            return out
        out.append(text[a + len(open_tag):b])
        pos = b + len(close_tag)


def _answer_tag(text: str) -> str | None:
    found = blocks(text, "<answer>", "</answer>")
    if not found:
        return None
    inner = found[-1]
    return _boxed(inner) or inner.strip()


def _hash(text: str) -> str | None:
    found = _HASH.findall(text)
    return found[-1].strip() if found and found[-1].strip() else None


def _spans(text: str) -> list[tuple[int, str]]:
    """Math spans as (start, content); bounded: spans over 500 characters are not answers."""
    out = []
    for m in _SPAN.finditer(text):
        content = next(g for g in m.groups() if g is not None)
        if content.strip() and len(content) <= 500:
            out.append((m.start(), content.strip()))
    return out


def _numbers(text: str) -> list[tuple[int, int, str]]:
    """Numbers standing alone as (start, end, text): a letter may follow only as a unit (``12cm``)."""
    out = []
    for m in _NUMBER.finditer(text):
        tail = re.match(r"[A-Za-z_]+", text[m.end():m.end() + 30])
        if tail and (tail.group(0).lower() not in UNITS):
            continue
        out.append((m.start(), m.end(), m.group(0)))
    return out


def _prose(text: str) -> str | None:
    tail = text[-4000:]
    anchors = list(_ANCHOR.finditer(tail))
    if anchors:
        seg = tail[anchors[-1].end():]
        end = re.search(r"\.(?=\s|$)|\n\s*\n|<\|", seg)
        seg = seg[:end.start()] if end else seg[:400]
        found = _prose_candidates(seg)
        if found:
            return found[-1][1]
    found = _prose_candidates(tail)
    return found[-1][1] if found else None


def _prose_candidates(text: str) -> list[tuple[int, str]]:
    """Math spans and numbers outside them, as (end position, answer), in order of their end."""
    spans = [(m.start(), m.end(), next(g for g in m.groups() if g is not None).strip())
             for m in _SPAN.finditer(text)]
    spans = [sp for sp in spans if sp[2] and len(sp[2]) <= 500]
    inside = [(a, b) for a, b, _ in spans]
    nums = [(a, b, t) for a, b, t in _numbers(text) if not any(x <= a < y for x, y in inside)]
    return sorted([(b, c) for _, b, c in spans] + [(b, t) for _, b, t in nums])


def _last_number(text: str) -> str | None:
    found = _numbers(text)
    return found[-1][2] if found else None


_EXTRACTORS = {"boxed": _boxed, "answer_tag": _answer_tag, "hash": _hash, "prose": _prose,
               "last_number": _last_number}


def extract_with_method(text: str, order=METHODS, max_chars: int = 10_000) -> tuple[str | None, str | None]:
    """(answer, method that found it); (None, None) when no method finds one."""
    text = text[-max_chars:]
    for method in order:
        ans = _EXTRACTORS[method](text)
        if ans is not None and ans.strip():
            if method == "boxed" and "prose" in order and _anchor_after_last_box(text):
                stated = _prose(text)     # "... \\boxed{200} ... The final answer is $10,455$."
                if stated:
                    return stated.strip(), "prose"
            return ans.strip(), method
    return None, None


def _anchor_after_last_box(text: str) -> bool:
    last = text.rfind("\\boxed")
    return last >= 0 and _ANCHOR.search(text, last) is not None and "\\boxed" not in text[
        _ANCHOR.search(text, last).end():]


def extract_answer(text: str, order=METHODS, max_chars: int = 10_000) -> str | None:
    """The final answer in `text` by the first method in `order` that finds one (None if none)."""
    return extract_with_method(text, order, max_chars)[0]


def gold_answer(gold) -> str:
    """The reference answer: a number, or a string that may hold ``#### x``, ``\\boxed{x}`` or ``$x$``."""
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        return repr(gold)
    gold = str(gold)
    found = extract_answer(gold, ("boxed", "hash"))
    if found:
        return found
    stripped = gold.strip()
    spans = _spans(stripped)
    if spans:
        between = _SPAN.split(stripped)
        outside = "".join(b for k, b in enumerate(between) if k % 5 == 0 and b)
        if len(outside.strip()) <= 12 or _joins(outside):
            return ", ".join(c for _, c in spans)    # "$x$" -> "x"; "$1$ and $2$" -> "1, 2"
        if re.search(r"[A-Za-z]{3,}\s+[A-Za-z]{3,}", outside):
            return _prose(stripped) or stripped      # a worked solution: its final answer
    return stripped
