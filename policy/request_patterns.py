"""The request classifier's own path rules (scoring.endpoints) as segment patterns the
kernel's sk_msg program can match: no second copy of the rule list.

Each family's prefix and rule regexes are expanded (alternations, optional groups, small
character classes) into sequences of path segments: a literal (hashed, FNV-1a 32-bit of the
lower-cased segment), a digit-shaped literal (`\\d{4}-\\d{2}-\\d{2}`: compared on a hash where
every digit is `0`), one segment of anything (`[^/]+`), or any rest (`(/.*)?`, last only).
A rule the expander cannot express becomes "its family's prefix and anything after it"
with every class the family can give, so the kernel's answer is always a superset of the
classifier's (tests/test_request_patterns.py checks it against classify_request).

The kernel takes, per family, the first pattern that matches (the classifier's first-match
order) and the union over families (it does not know the endpoint's provider, so it
assumes every provider's layout, as classify_request does for a custom endpoint). A
restricted socket's request is let through only when every class in that union is one
its caller may use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

try:
    import re._parser as sre_parse  # type: ignore[import-not-found]
except ImportError:  # Python < 3.11
    import sre_parse  # type: ignore[no-redef]

from scoring.endpoints import _FAMILIES, METADATA, OTHER, REQUEST_CLASSES, SESSION

MAX_SEGMENTS = 8  # segments the kernel hashes; patterns never need more
MAX_PATTERNS = 192
MIDDLE_REST = 3  # `(/.*)?` inside a path: up to this many segments, then "anything"
LIT, DIGITS, ANY1, REST = 0, 1, 2, 3
FLAG_QUERY = 1  # matches only a request with a query (WireServer's comp=/type=)
FLAG_PUT = 2  # the session handshake: any other method is `other`
ROOT_FAMILY = 31


def class_bit(cls: str) -> int:
    return 1 << REQUEST_CLASSES.index(cls)


ALL_CLASSES = (1 << len(REQUEST_CLASSES)) - 1


def fnv1a(text: str) -> int:
    h = 2166136261
    for b in text.encode():
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def digit_shape(text: str) -> str:
    return re.sub(r"[0-9]", "0", text)


@dataclass(frozen=True)
class Pattern:
    family: int
    segments: tuple[tuple[int, str], ...]  # (kind, text) for LIT/DIGITS, text "" otherwise
    rest: bool  # any number of further segments (zero included)
    mask: int  # classes this pattern gives
    flags: int = 0

    def hashes(self) -> list[tuple[int, int]]:
        """(kind, value) per segment as the kernel compares them."""
        out = []
        for kind, text in self.segments:
            value = fnv1a(text) if kind == LIT else fnv1a(digit_shape(text)) if kind == DIGITS \
                else 0
            out.append((kind, value))
        return out


class _Unsupported(Exception):
    pass


_DIGIT = object()  # one `\d`
_SEG = object()  # `[^/]+`
_ANY = object()  # `.*`


def _expand(items: list) -> list[list]:
    """Every token sequence the parsed regex can produce (tokens: characters, _DIGIT,
    _SEG, _ANY)."""
    outs: list[list] = [[]]
    for op, av in items:
        name = str(op)
        if name == "LITERAL":
            alts = [[chr(av)]]
        elif name == "SUBPATTERN":
            alts = _expand(list(av[-1]))
        elif name == "BRANCH":
            alts = [seq for branch in av[1] for seq in _expand(list(branch))]
        elif name == "IN":
            alts = _in(av)
        elif name in ("MAX_REPEAT", "MIN_REPEAT"):
            alts = _repeat(*av)
        else:
            raise _Unsupported(name)
        outs = [o + a for o in outs for a in alts]
        if len(outs) > 256:
            raise _Unsupported("too many expansions")
    return outs


def _in(av: list) -> list[list]:
    alts: list[list] = []
    for op, v in av:
        name = str(op)
        if name == "LITERAL":
            alts.append([chr(v)])
        elif name == "RANGE" and v[1] - v[0] < 16:
            alts.extend([chr(c)] for c in range(v[0], v[1] + 1))
        elif name == "CATEGORY" and str(v) == "CATEGORY_DIGIT":
            alts.append([_DIGIT])
        else:
            raise _Unsupported(name)
    return alts


def _repeat(lo: int, hi: int, sub: object) -> list[list]:
    items = list(sub)  # type: ignore[call-overload]
    kinds = [str(op) for op, _ in items]
    if kinds == ["ANY"] and lo == 0:
        return [[_ANY]]
    if kinds == ["NOT_LITERAL"] and items[0][1] == ord("/") and lo == 1:
        return [[_SEG]]
    if kinds == ["IN"] and lo == 1 and str(items[0][1][0][0]) == "NEGATE" and \
            [str(op) for op, _ in items[0][1][1:]] == ["LITERAL"] and items[0][1][1][1] == 47:
        return [[_SEG]]
    inner = _expand(items)
    if lo == 0 and hi == 1:
        return [*inner, []]  # greedy, as the regex: the longer reading is tried first
    if lo == hi and lo <= 8:
        outs: list[list] = [[]]
        for _ in range(lo):
            outs = [o + i for o in outs for i in inner]
        return outs
    raise _Unsupported("repeat")


def _segments(tokens: list) -> tuple[list[tuple[int, str]], bool, bool]:
    """(segments, rest, query) of one expansion of a path regex."""
    query = False
    if "?" in tokens:
        tokens = tokens[:tokens.index("?")]
        query = True
    parts: list[list] = [[]]
    for t in tokens:
        if t == "/":
            parts.append([])
        else:
            parts[-1].append(t)
    if parts and parts[0] == []:
        parts = parts[1:]
    if parts and parts[-1] == []:
        parts = parts[:-1]  # a trailing slash: the same path
    segs: list[tuple[int, str]] = []
    rest = False
    for i, part in enumerate(parts):
        if part == [_ANY]:
            if i != len(parts) - 1:
                raise _Unsupported("middle rest")
            rest = True
        elif part == [_SEG]:
            segs.append((ANY1, ""))
        elif any(t is _ANY or t is _SEG for t in part) or not part:
            raise _Unsupported("partial segment")
        elif any(t is _DIGIT for t in part):
            segs.append((DIGITS, "".join("0" if t is _DIGIT else t for t in part)))
        else:
            segs.append((LIT, "".join(part)))
    return segs, rest, query


def _paths(regex: str) -> list[tuple[list[tuple[int, str]], bool, bool, bool]]:
    """Every (segments, rest, query, wide) a path regex stands for. A `(/.*)?` in the middle
    of a path becomes 0..MIDDLE_REST single segments, and one more expansion with more
    segments and any rest, `wide`: what follows it there may be of any class its family
    gives."""
    out = []
    for tokens in _expand(list(sre_parse.parse(regex))):
        try:
            out.append((*_segments(tokens), False))
        except _Unsupported as exc:
            if str(exc) != "middle rest":
                raise
            at = next(i for i, t in enumerate(tokens) if t is _ANY)
            head, tail = tokens[:at], tokens[at + 1:]
            if head and head[-1] == "/":
                head = head[:-1]
            for n in range(MIDDLE_REST + 1):
                out.append((*_segments(head + ["/", _SEG] * n + tail), False))
            segs, _, query = _segments(head + ["/", _SEG] * (MIDDLE_REST + 1))
            out.append((segs, True, query, True))
    return out


def patterns() -> list[Pattern]:
    """The kernel's patterns, in the classifier's order."""
    out: list[Pattern] = [Pattern(ROOT_FAMILY, (), False, class_bit(METADATA))]
    for fam, (_providers, prefix, rules, default) in enumerate(_FAMILIES):
        fam_mask = class_bit(default)
        for _rule, cls in rules:
            fam_mask |= class_bit(cls) | (class_bit(OTHER) if cls == SESSION else 0)
        for pre_segs, pre_rest, _, _ in _paths(prefix):
            if pre_rest:
                raise ValueError(f"family prefix {prefix} ends in a rest")
            query_at: int | None = None
            query_mask = class_bit(default)
            for rule, cls in rules:
                try:
                    expansions = _paths(rule)
                except _Unsupported:
                    out.append(Pattern(fam, tuple(pre_segs), True, fam_mask))
                    continue
                for segs, rest, query, wide in expansions:
                    if query:
                        # The classifier reads the query for these rules; the kernel does
                        # not: a request with a query may be any of them, or the default.
                        query_mask |= class_bit(cls)
                        if query_at is None:
                            query_at = len(out)
                            out.append(Pattern(fam, tuple(pre_segs), False, 0, FLAG_QUERY))
                        continue
                    out.append(Pattern(fam, tuple(pre_segs + segs), rest,
                                       fam_mask if wide else class_bit(cls),
                                       FLAG_PUT if cls == SESSION else 0))
            if query_at is not None:
                out[query_at] = Pattern(fam, tuple(pre_segs), False, query_mask, FLAG_QUERY)
            out.append(Pattern(fam, tuple(pre_segs), True, class_bit(default)))
    seen: set[tuple] = set()
    unique = []
    for p in out:  # a repeat can never match first: dropped
        key = (p.family, p.segments, p.rest, p.flags)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    if len(unique) > MAX_PATTERNS or any(len(p.segments) > MAX_SEGMENTS for p in unique):
        raise ValueError("the request patterns outgrew the kernel's table")
    return unique


def classify(method: str, path: str, query: bool, pats: list[Pattern] | None = None) -> int:
    """The kernel's answer, in Python (for tests): the class mask of a canonical request
    (path lower-cased, no `//`, `%`, `\\`, `.` segments)."""
    pats = patterns() if pats is None else pats
    segs = [s for s in path.lower().split("/") if s]
    done = 0
    mask = 0
    for p in pats:
        if done & (1 << p.family):
            continue
        if p.flags & FLAG_QUERY and not query:
            continue
        n = len(p.segments)
        if len(segs) < n or (not p.rest and len(segs) != n):
            continue
        ok = True
        for (kind, text), seg in zip(p.segments, segs, strict=False):
            if kind == LIT and seg != text or kind == DIGITS and digit_shape(seg) != text:
                ok = False
                break
        if not ok:
            continue
        done |= 1 << p.family
        if p.flags & FLAG_PUT and method.upper() != "PUT":
            mask |= class_bit(OTHER)
        else:
            mask |= p.mask
    return mask or class_bit(OTHER)
