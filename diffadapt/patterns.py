"""Bounded regular expressions for patterns that come from files or users.

``target_modules`` strings, ``exclude_modules`` strings, ``modules_to_save`` entries,
``overrides`` keys, ``layers_pattern`` and FourierFT's ``n_frequency_pattern`` keys are regexes
matched against module paths with Python's backtracking ``re``. A pattern such as ``(a+)+$`` or
``(x+x+)+y`` takes exponential time on a long enough name, and a long chain of wildcards
(``.*.*.*.*.*.*x``) polynomial time of high degree: one bad pattern in a downloaded file would
freeze the program. Every such pattern goes through :func:`compile_pattern` once (cached):

* at most :data:`MAX_PATTERN_CHARS` characters and :data:`MAX_NESTING` nested groups;
* no backreferences or conditional groups (they make matching NP-hard);
* a bound on the backtracking search, computed from the parsed pattern: the number of ways
  the pattern's choices (alternatives, repetition counts) can be combined on a name of
  :data:`REFERENCE_NAME_CHARS` characters must stay under :data:`MAX_WAYS`. A repetition of an
  ambiguous sub-pattern (``(a+)+``, ``(a|a)*``, ``(.*x)*``) has exponentially many ways and is
  refused; ``.*`` counts once per character it could stop at, except where what follows cannot
  start inside it (``\\d+\\.``: only the full digit run can be followed by ``.``) or at the end
  of a full match. The search explores each way at most once, doing bounded work per way, so an
  accepted pattern matches in bounded time (a few ms on a module path in the worst case). A
  name longer than that reference is matched if the bound grows at most quadratically with it.

Lookarounds are allowed (``^(?!.*text_model).*to_q``); their bodies are bounded the same way.
Refusals are one-line :class:`UnsafePatternError` (a ``ValueError``) naming the field and the
pattern, truncated.
"""

from __future__ import annotations

import functools
import math
import re
from re import _constants as C  # noqa: N812  (the stdlib's own parser: exactly what re compiles)
from re import _parser as P  # noqa: N812
from typing import Optional

MAX_PATTERN_CHARS = 1000
MAX_NESTING = 40
REFERENCE_NAME_CHARS = 128  # longer than any diffusers / transformers module path in practice
MAX_WAYS = 500_000  # ~50 ns per way in CPython's re: well under 0.1 s per name

_INF = math.inf
_SINGLE = (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN)
_END = "end"  # follow: the end of the name


class UnsafePatternError(ValueError):
    """A pattern whose matching time cannot be bounded (or that is too long)."""


def shorten(text: object, limit: int = 80) -> str:
    """``repr`` of ``text`` cut to ``limit`` characters (one line, for error messages)."""
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 5] + "...'" + f" ({len(str(text))} chars)"


def _refuse(field: str, pattern: str, why: str) -> UnsafePatternError:
    return UnsafePatternError(
        f"{field} pattern {shorten(pattern)} is refused: {why}. Use module-name suffixes or a simpler regex "
        r"(e.g. '.*attn1\.(to_q|to_v)')."
    )


class _Unsafe(Exception):
    pass


def _ascii_in(op, av, ch: str, ignorecase: bool) -> Optional[bool]:
    """Whether the single-character element ``(op, av)`` matches ASCII ``ch``; None if unsure."""
    if ignorecase or not ch.isascii():
        return None
    if op == C.LITERAL:
        return ord(ch) == av
    if op == C.NOT_LITERAL:
        return ord(ch) != av
    if op == C.ANY:
        return ch != "\n" or None
    if op != C.IN:
        return None
    negate, hit = False, False
    for iop, iav in av:
        if iop == C.NEGATE:
            negate = True
        elif iop == C.LITERAL:
            hit |= ord(ch) == iav
        elif iop == C.RANGE:
            hit |= iav[0] <= ord(ch) <= iav[1]
        elif iop == C.CATEGORY:
            test = {
                C.CATEGORY_DIGIT: ch.isdigit(), C.CATEGORY_NOT_DIGIT: not ch.isdigit(),
                C.CATEGORY_WORD: ch.isalnum() or ch == "_", C.CATEGORY_NOT_WORD: not (ch.isalnum() or ch == "_"),
                C.CATEGORY_SPACE: ch in " \t\n\r\f\v", C.CATEGORY_NOT_SPACE: ch not in " \t\n\r\f\v",
            }.get(iav)
            if test is None:
                return None
            hit |= test
        else:
            return None
    return hit != negate


def _first_chars(items: list, i: int, follow) -> object:
    """What can come right after ``items[i - 1]``: a set of ASCII characters, ``_END``, or None
    (anything)."""
    if i >= len(items):
        return follow
    op, av = items[i]
    if op == C.LITERAL:
        return {chr(av)} if av < 128 else None
    if op == C.IN and all(iop == C.LITERAL and iav < 128 for iop, iav in av):
        return {chr(iav) for _, iav in av}
    if op == C.AT and av == C.AT_END_STRING:
        return _END
    if op == C.SUBPATTERN and av[3].data and av[3].getwidth()[0] > 0:
        return _first_chars(list(av[3].data), 0, None)
    return None


class _Ways:
    """Bounds on the number of ways a (sub-)pattern can match, for names of at most ``n`` chars:
    ``total`` (any length) and ``by_len[d]`` (consuming exactly ``d`` characters)."""

    __slots__ = ("total", "by_len")

    def __init__(self, total: float, by_len: dict[int, float]):
        self.total, self.by_len = total, by_len

    def count(self) -> float:
        return self.total if self.by_len is None else min(self.total, sum(self.by_len.values()))


def _cap(x: float) -> float:
    return _INF if x > 1e30 else x


class _Analysis:
    def __init__(self, n: int, flags: int, lengths: bool = True):
        self.n = n
        self.lengths = lengths  # also count by consumed length (tighter; costs O(n^2) per node)
        self.ignorecase = bool(flags & re.IGNORECASE)
        self.extra = 0.0  # work of top-level lookarounds

    def conv(self, a: Optional[dict], b: Optional[dict]) -> Optional[dict]:
        if a is None or b is None:
            return None
        out: dict[int, float] = {}
        for i, x in a.items():
            for j, y in b.items():
                if i + j <= self.n:
                    out[i + j] = _cap(out.get(i + j, 0.0) + x * y)
        return out

    def vec(self, v: dict) -> Optional[dict]:
        return v if self.lengths else None

    @staticmethod
    def add(a: Optional[dict], b: Optional[dict]) -> Optional[dict]:
        if a is None or b is None:
            return None
        out = dict(a)
        for d, x in b.items():
            out[d] = _cap(out.get(d, 0.0) + x)
        return out

    def seq(self, items: list, follow, depth: int) -> _Ways:
        if depth > MAX_NESTING:
            raise _Unsafe(f"more than {MAX_NESTING} nested groups")
        ways = _Ways(1.0, self.vec({0: 1.0}))
        for i, item in enumerate(items):
            if depth == 0 and item[0] in (C.ASSERT, C.ASSERT_NOT):
                # a top-level lookaround is atomic: one way on, its own search once per way that reaches it
                inner = self.seq(list(item[1][1].data), None, depth + 1)
                self.extra = _cap(self.extra + ways.count() * inner.count())
                continue
            w = self.item(item, _first_chars(items, i + 1, follow), depth)
            ways = _Ways(_cap(ways.total * w.total), self.conv(ways.by_len, w.by_len))
            if ways.count() > MAX_WAYS * 1e6:
                raise _Unsafe("its backtracking search grows exponentially")
        return ways

    def deterministic(self, body, follow) -> bool:
        """A single-character repetition whose follower cannot start inside it: only one stop
        continues the match (``\\d+\\.``, ``[^.]*\\.``, a trailing ``.*`` of a full match)."""
        if follow == _END:
            return True
        if not follow:
            return False
        (op, av), = body
        return all(_ascii_in(op, av, ch, self.ignorecase) is False for ch in follow)

    def item(self, item, follow, depth: int) -> _Ways:
        op, av = item
        n = self.n
        if op in _SINGLE:
            return _Ways(1.0, self.vec({1: 1.0}))
        if op == C.AT:
            return _Ways(1.0, self.vec({0: 1.0}))
        if op in (C.GROUPREF, C.GROUPREF_EXISTS, C.GROUPREF_IGNORE, C.GROUPREF_LOC_IGNORE, C.GROUPREF_UNI_IGNORE):
            raise _Unsafe("backreferences and conditional groups are not allowed")
        if op == C.SUBPATTERN:
            return self.seq(list(av[3].data), follow, depth + 1)
        if op == C.ATOMIC_GROUP:
            return self.seq(list(av.data), follow, depth + 1)
        if op in (C.ASSERT, C.ASSERT_NOT):  # zero width; its own search counts against the total
            inner = self.seq(list(av[1].data), None, depth + 1)
            return _Ways(inner.count(), self.vec({0: inner.count()}))
        if op == C.BRANCH:
            branches = [self.seq(list(b.data), follow, depth + 1) for b in av[1]]
            by_len: Optional[dict[int, float]] = self.vec({})
            for b in branches:
                by_len = self.add(by_len, b.by_len)
            return _Ways(_cap(sum(b.total for b in branches)), by_len)
        if op in (C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT):
            lo, hi, body = av
            hi_n = n if hi == C.MAXREPEAT else min(hi, n)
            data = list(body.data)
            if len(data) == 1 and data[0][0] in _SINGLE:  # x*, \d+, [^.]{2,5}
                stops = max(0, hi_n - lo + 1)
                by_len = self.vec({d: 1.0 for d in range(lo, hi_n + 1)} if self.lengths else {})
                total = 1.0 if self.deterministic(data, follow) else float(stops)
                return _Ways(min(total, float(stops)) if stops else 0.0, by_len)
            inner = self.seq(data, None, depth + 1)
            width = body.getwidth()[0]
            if hi == C.MAXREPEAT and width == 0:
                raise _Unsafe("it repeats a part that can match nothing")
            reps = hi_n if width == 0 else min(hi_n, n // width)
            if inner.total > 1 and hi == C.MAXREPEAT:
                raise _Unsafe("it repeats a part that can match the same text in several ways (a nested quantifier)")
            total, by_len, power = 0.0, self.vec({}), self.vec({0: 1.0})
            for k in range(0, reps + 1):
                if k:
                    power = self.conv(power, inner.by_len)
                if k >= lo:
                    total = _cap(total + inner.total ** k)
                    by_len = self.add(by_len, power)
                if power == {} or total > MAX_WAYS * 1e6:
                    break
            return _Ways(total, by_len)
        raise _Unsafe(f"it uses {op} (not supported for patterns from files)")


def _ways(parsed, n: int, full: bool, lengths: bool = True) -> float:
    analysis = _Analysis(n, parsed.state.flags, lengths)
    return analysis.seq(list(parsed.data), _END if full else None, 0).count() + analysis.extra


@functools.lru_cache(maxsize=4096)
def _checked(pattern: str, full: bool) -> tuple[Optional[re.Pattern], Optional[str], object]:
    """(compiled or None if not a regex, reason it is refused or None, parsed pattern)."""
    if len(pattern) > MAX_PATTERN_CHARS:
        return None, f"it is {len(pattern)} characters long (at most {MAX_PATTERN_CHARS})", None
    try:
        parsed = P.parse(pattern)
        compiled = re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError):
        return None, None, None
    try:
        ways = _ways(parsed, REFERENCE_NAME_CHARS, full)
    except (_Unsafe,) as exc:
        return None, str(exc), None
    except RecursionError:
        return None, f"more than {MAX_NESTING} nested groups", None
    if ways > MAX_WAYS:
        return None, (
            f"matching it can take ~{ways:.1e} backtracking steps on a {REFERENCE_NAME_CHARS}-character name "
            f"(at most {MAX_WAYS:.0e}; too many wildcards or alternatives in a row)"
        ), None
    return compiled, None, parsed


@functools.lru_cache(maxsize=4096)
def _long_name_ok(pattern: str, full: bool, n: int) -> Optional[str]:
    parsed = _checked(pattern, full)[2]
    ways = _ways(parsed, n, full, lengths=False)  # the product bound: O(pattern), whatever n is
    budget = MAX_WAYS * (n / REFERENCE_NAME_CHARS) ** 2  # linear-time work per character of a longer name
    return None if ways <= budget else f"matching it against a {n}-character name can take ~{ways:.1e} steps"


def compile_pattern(pattern: object, field: str, full: bool = True) -> Optional[re.Pattern]:
    """The compiled regex of ``pattern`` (``full``: used with fullmatch), None if it is not a
    valid regex; UnsafePatternError naming ``field`` if its matching time cannot be bounded."""
    if not isinstance(pattern, str):
        raise UnsafePatternError(f"{field} pattern {shorten(pattern)} must be a string, got {type(pattern).__name__}.")
    compiled, why, _ = _checked(pattern, full)
    if why is not None:
        raise _refuse(field, pattern, why)
    return compiled


def check_pattern(pattern: object, field: str, full: bool = True) -> None:
    """Raise UnsafePatternError if ``pattern`` may not be used (see :func:`compile_pattern`)."""
    compile_pattern(pattern, field, full)


def _bounded(pattern: str, name: str, field: str, full: bool) -> Optional[re.Pattern]:
    """The compiled, checked ``pattern`` for matching ``name`` (None if it is not a regex)."""
    compiled = compile_pattern(pattern, field, full)
    if compiled is not None and len(name) > REFERENCE_NAME_CHARS:
        why = _long_name_ok(pattern, full, len(name))
        if why is not None:
            raise _refuse(field, pattern, why)
    return compiled


def fullmatch(pattern: str, name: str, field: str = "pattern") -> bool:
    """``re.fullmatch(pattern, name)`` with the pattern bounded; False if it is not a regex."""
    compiled = _bounded(pattern, name, field, True)
    return compiled is not None and compiled.fullmatch(name) is not None


def match(pattern: str, name: str, field: str = "pattern") -> Optional[re.Match]:
    """``re.match(pattern, name)`` (anchored at the start only) with the pattern bounded."""
    compiled = _bounded(pattern, name, field, False)
    return None if compiled is None else compiled.match(name)
