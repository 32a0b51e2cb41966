"""Personal data in free text: where it is and of which kind, for the scrubber and the scan of generations.

Every kind is found the same way: a cheap candidate (a regex, or a pre-check before a library call) that a
check must confirm, so look-alikes survive: a card passes Luhn and has a card network's prefix and length (a
19-digit tweet id does not), an IBAN has its country's length and passes mod-97, an SSN has an area, group
and serial the SSA issues, an IP address parses with `ipaddress`, a phone number is one `phonenumbers` calls
valid, read in each of `data.phone_regions` (a number written with +CC is read whatever the regions).
Person names need Presidio (the optional extra `murmur[pii]`).
"""

from __future__ import annotations

import bisect
import ipaddress
import re
from dataclasses import dataclass

import phonenumbers

from murmur.errors import MurmurError

# In the order overlaps are settled: a span claimed by an earlier kind is not matched again by a later one
# (the digits of an IBAN or a card are not also a phone number).
KINDS = ("email", "ip", "iban", "card", "ssn", "phone", "name")

EMAIL_RE = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
IPV4_RE = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?!\w|\.\d)")
# Eight groups, or fewer around a "::", optionally ending in an IPv4 address (::ffff:192.0.2.1).
IPV6_RE = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\d)")
# Generous on purpose (it may run into the next word): the check cuts it at the country's IBAN length.
IBAN_RE = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]){11,30}")
CARD_RE = re.compile(r"(?<![\w+-])\d(?:[ -]?\d){12,18}(?![\w-])")
SSN_RE = re.compile(r"(?<![\w-])(\d{3})([- ])(\d{2})\2(\d{4})(?![\w-])")
# A run of seven or more digits with at most short separators between them: the fewest any valid phone
# number has. Most posts have none, so most never reach the (pure Python, ~0.2 ms a call) phone matcher.
PHONE_RUN_RE = re.compile(r"\d(?:[^\w\n,;:]{0,3}\d){6,}")
# The matcher reads each run with this much text around it (a leading "+" or "(", a trailing "ext. 1234").
PHONE_CONTEXT_CHARS = 12
# No phone number, however punctuated, is longer; a longer run is a list of digits, read as phone numbers
# that are not told apart: scrubbed whole, unread.
PHONE_RUN_MAX_CHARS = 64
# The matcher leaves out slash-separated dates but reads some dotted ones (13.10.2017) as numbers.
DATE_LIKE_RE = re.compile(r"\d{1,2}([./-])\d{1,2}\1(?:\d{2}|\d{4})")

# IBAN length by country (the SWIFT IBAN registry).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28,
    "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20,
    "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25,
    "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
    "SO": 23, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}

# Card networks: (first prefix, last prefix, allowed lengths). Visa, Amex, Mastercard, Diners, JCB, and the
# 5x/6x ranges of Maestro, Discover and UnionPay.
CARD_RANGES = (
    ("4", "4", (13, 16, 19)), ("34", "34", (15,)), ("37", "37", (15,)), ("51", "55", (16,)),
    ("2221", "2720", (16,)), ("300", "305", range(14, 20)), ("36", "36", range(14, 20)),
    ("38", "39", range(14, 20)), ("3528", "3589", range(16, 20)), ("50", "50", range(12, 20)),
    ("56", "69", range(12, 20)),
)
# The same as a lookup by the first four digits (digit runs are checked by the thousand in a long text).
CARD_LENGTHS = {}
for _first, _last, _lengths in CARD_RANGES:
    for _prefix in range(int(_first.ljust(4, "0")), int(_last.ljust(4, "9")) + 1):
        CARD_LENGTHS.setdefault(f"{_prefix:04d}", set()).update(_lengths)


@dataclass(frozen=True, slots=True)
class PiiMatch:
    """One piece of personal data: its kind and where it is in the text."""

    kind: str
    start: int
    end: int


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def card_number_end(match: re.Match) -> int | None:
    """A card number: printed as one run or in the groups cards use, of a network's prefix and length, Luhn-valid."""
    printed = match.group(0)
    digits = printed.replace(" ", "").replace("-", "")
    if len(digits) not in CARD_LENGTHS.get(digits[:4], ()):
        return None
    if len(digits) != len(printed):
        groups = [len(group) for group in re.split(r"[ -]", printed)]
        # 4-4-4-4 and the like, Amex 4-6-5, Diners 4-6-4; an order id 660-4331923-8375046 is none of them.
        if groups not in ([4, 6, 5], [4, 6, 4]) and not (all(n == 4 for n in groups[:-1]) and groups[-1] <= 4):
            return None
    return match.end() if luhn_valid(digits) else None


def iban_end(match: re.Match) -> int | None:
    """Where the IBAN starting at `match` ends, if it has its country's length and passes mod-97."""
    candidate = match.group(0)
    length = IBAN_LENGTHS.get(candidate[:2].upper())
    if length is None:
        return None
    kept, end = 0, 0
    while kept < length and end < len(candidate):
        kept += candidate[end] != " "
        end += 1
    if kept < length or (end < len(candidate) and candidate[end] != " "):
        return None  # too short, or the country's length ends inside a group
    code = candidate[:end].replace(" ", "").upper()
    rearranged = code[4:] + code[:4]
    return match.start() + end if int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1 else None


def ssn_end(match: re.Match) -> int | None:
    """US Social Security numbers: never area 000, 666 or 9xx, group 00 or serial 0000."""
    area, group, serial = match.group(1), match.group(3), match.group(4)
    issued = area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"
    return match.end() if issued else None


def ip_end(match: re.Match) -> int | None:
    candidate = match.group(0)
    try:
        if ":" in candidate:
            # A digit keeps hex words and C++ scopes ("dead::beef", "a::b") out.
            if not any(c.isdigit() for c in candidate):
                return None
            ipaddress.IPv6Address(candidate)
        else:
            # Leading zeros (192.168.001.010) are still an address; ipaddress refuses them as ambiguous.
            ipaddress.IPv4Address(".".join(str(int(part)) for part in candidate.split(".")))
    except ValueError:
        return None
    return match.end()


# Regex-found kinds: [(pattern, end of the confirmed span or None, a character the text must contain)].
REGEX_RULES = {
    "email": [(EMAIL_RE, None, "@")],
    "ip": [(IPV6_RE, ip_end, ":"), (IPV4_RE, ip_end, ".")],
    "iban": [(IBAN_RE, iban_end, "")],
    "card": [(CARD_RE, card_number_end, "")],
    "ssn": [(SSN_RE, ssn_end, "")],
}
DIGIT_RE = re.compile(r"\d")


class PiiDetector:
    """Finds the personal data of the chosen kinds; build once per worker (it compiles and loads models)."""

    def __init__(self, kinds, phone_regions=("US",), name_min_score: float = 0.5, phone_max_runs: int = 32):
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise MurmurError(f"unknown personal-data kinds {unknown}; use {', '.join(KINDS)}")
        self.kinds = [kind for kind in KINDS if kind in set(kinds)]
        # Regions sharing a calling code (US and CA) read the same numbers: one pass serves them all.
        codes: dict[int, str] = {}
        for region in phone_regions:
            codes.setdefault(phonenumbers.country_code_for_region(region.upper()), region.upper())
        self.phone_regions = list(codes.values()) or ["ZZ"]  # ZZ: only numbers written with +CC
        # Where dialling at home needs a trunk prefix (the 0 of 020 7946 0958), national numbers are written
        # with it: a run without it is not read in that region (a matcher pass saved, a false reading avoided).
        # NANPA's 1 is optional, so US and CA read every run.
        self.trunk_prefixes = {}
        for region in self.phone_regions:
            metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
            if metadata is not None and metadata.country_code != 1:
                self.trunk_prefixes[region] = metadata.national_prefix or ""
        self.name_min_score = name_min_score
        self.phone_max_runs = phone_max_runs
        self.analyzer = _presidio_analyzer() if "name" in self.kinds else None

    @classmethod
    def from_settings(cls, settings) -> PiiDetector:
        """The detector `murmur.settings.data.DataSettings` asks for."""
        return cls(settings.scrub, settings.phone_regions, settings.name_min_score, settings.phone_max_runs)

    def find(self, text: str) -> list[PiiMatch]:
        """The personal data in `text`, in text order, without overlaps."""
        has_digit = DIGIT_RE.search(text) is not None
        if not has_digit and "@" not in text and self.analyzer is None:
            return []  # most posts: nothing to look at
        taken: list[tuple[int, int]] = []  # accepted spans, sorted
        found: list[PiiMatch] = []
        for kind in self.kinds:
            if kind == "phone":
                # Digits already claimed (an IP address, a card) are hidden from the phone matcher.
                spans = self._phones(_masked(text, taken)) if has_digit else []
            elif kind == "name":
                spans = self._names(text)
            else:
                spans = self._regex_spans(kind, text, has_digit)
            for start, end in spans:
                if _claim(taken, start, end):
                    found.append(PiiMatch(kind, start, end))
        found.sort(key=lambda m: m.start)
        return found

    def scrub(self, text: str) -> tuple[str, int]:
        """`text` with each piece of personal data replaced by `<kind>`, and how many were replaced."""
        matches = self.find(text)
        if not matches:
            return text, 0
        pieces, cursor = [], 0
        for match in matches:
            pieces += [text[cursor:match.start], f"<{match.kind}>"]
            cursor = match.end
        pieces.append(text[cursor:])
        return "".join(pieces), len(matches)

    def _regex_spans(self, kind: str, text: str, has_digit: bool) -> list[tuple[int, int]]:
        spans = []
        for pattern, confirm, needed in REGEX_RULES[kind]:
            if needed not in text or (kind != "email" and not has_digit):
                continue
            position = 0
            while (match := pattern.search(text, position)) is not None:
                end = match.end() if confirm is None else confirm(match)
                if end is None:
                    # A refused candidate may hide a real one starting inside it ("ab12 GB82 WEST ...").
                    position = match.start() + 1
                else:
                    spans.append((match.start(), end))
                    position = end
        return spans

    def _phones(self, text: str) -> list[tuple[int, int]]:
        """Phone numbers, read by phonenumbers' matcher in a window around each run of digits.

        Work per text is bounded: past `phone_max_runs` runs, and for any run over PHONE_RUN_MAX_CHARS, the
        run itself is scrubbed unread (a privacy-first default for texts that are mostly digits)."""
        spans: list[tuple[int, int]] = []
        for index, run in enumerate(PHONE_RUN_RE.finditer(text)):
            start, end = run.span()
            if index >= self.phone_max_runs or end - start > PHONE_RUN_MAX_CHARS:
                spans.append((start, end))
                continue
            offset = max(0, start - PHONE_CONTEXT_CHARS)
            window = text[offset:end + PHONE_CONTEXT_CHARS]
            if text[start - 1:start] in ("+", "\uff0b"):
                regions = self.phone_regions[:1]  # +CC: every region reads it the same way
            else:
                regions = [r for r in self.phone_regions if text.startswith(self.trunk_prefixes.get(r, ""), start)]
            read: list[tuple[int, int]] = []
            for region in regions:
                for m in phonenumbers.PhoneNumberMatcher(window, region, leniency=phonenumbers.Leniency.VALID):
                    # Only numbers in this run: the context may hold the cut-off edge of the next one.
                    if offset + m.start < end and offset + m.end > start and not DATE_LIKE_RE.fullmatch(m.raw_string):
                        read.append((offset + m.start, offset + m.end))
                covered = _union(read)
                unread = sum(text[i].isdigit() and not _overlaps(covered, i, i + 1) for i in range(start, end))
                if unread < 7:
                    break  # the rest of the run is too short to be another number
            spans += read
        return spans

    def _names(self, text: str) -> list[tuple[int, int]]:
        results = self.analyzer.analyze(text=text, entities=["PERSON"], language="en")
        return [(r.start, r.end) for r in results if r.score >= self.name_min_score]


def _union(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The same positions as `spans`, as sorted disjoint spans."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _masked(text: str, taken: list[tuple[int, int]]) -> str:
    """`text` with the sorted spans in `taken` blanked out by "_" (no number runs across it), same length."""
    if not taken:
        return text
    pieces, cursor = [], 0
    for start, end in taken:
        pieces += [text[cursor:start], "_" * (end - start)]
        cursor = end
    pieces.append(text[cursor:])
    return "".join(pieces)


def _overlaps(disjoint: list[tuple[int, int]], start: int, end: int) -> bool:
    """Does [start, end) overlap one of the sorted, disjoint spans?"""
    index = bisect.bisect_left(disjoint, (end, end))  # the spans starting before `end`; the last reaches furthest
    return index > 0 and disjoint[index - 1][1] > start


def _claim(taken: list[tuple[int, int]], start: int, end: int) -> bool:
    """Add [start, end) to the sorted, disjoint spans in `taken` unless it overlaps one of them."""
    if _overlaps(taken, start, end):
        return False
    bisect.insort(taken, (start, end))
    return True


def _presidio_analyzer():
    try:
        from presidio_analyzer import AnalyzerEngine
    except ImportError:
        raise MurmurError("data.scrub includes 'name', which needs Presidio: pip install 'murmur[pii]' and a spaCy "
                          "English model (python -m spacy download en_core_web_lg), or remove 'name' from "
                          "data.scrub") from None
    return AnalyzerEngine()
