"""Text cleaning: entities by policy, HTML entities, Unicode NFC, control characters, personal data, whitespace.

Personal data (found by murmur.data.pii) is replaced by typed placeholders (<email>, <phone>, <card>, <ip>,
<iban>, <ssn>, <name>, or <NAME> for a pattern the settings add) so a model learns that something stood there
without learning what.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import urlparse

from murmur.data.pii import PiiDetector
from murmur.data.records import Post
from murmur.settings.data import DataSettings

URL_RE = re.compile(r"(?:https?://|www\.)[^\s<>\"']+", re.IGNORECASE)
MENTION_RE = re.compile(r"(?<![\w@])@(\w{1,30})")
LEADING_MENTIONS_RE = re.compile(r"^(?:\s*@\w+)+\s*")
CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
SPACES_RE = re.compile(r"[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
BLANK_LINES_RE = re.compile(r"\s*\n\s*")
# Literal control tokens such as <|im_end|>: left in a post, the tokenizer would read them as the real special
# token, so one post could end a turn or forge a system message in every chat built from it.
SPECIAL_TOKEN_RE = re.compile(r"<\|[A-Za-z0-9_.-]{1,40}\|>")
SHORTENERS = {"t.co", "bit.ly", "tinyurl.com", "goo.gl", "ow.ly", "buff.ly"}


@dataclass(slots=True)
class Cleaned:
    """A cleaned text and what cleaning saw in it (for the filters)."""

    text: str
    links: int
    scrubbed: int


class Cleaner:
    """Cleans post texts according to the settings; compiled once per worker."""

    def __init__(self, settings: DataSettings):
        self.settings = settings
        self.pii = PiiDetector.from_settings(settings)
        self.extra = [(re.compile(pattern), f"<{name}>") for name, pattern in settings.scrub_patterns.items()]

    def url_replacement(self, url: str) -> str:
        policy = self.settings.urls
        if policy == "keep":
            return url
        if policy == "remove":
            return ""
        if policy == "domain":
            try:
                host = (urlparse(url if "://" in url else "http://" + url).hostname or "").removeprefix("www.")
            except ValueError:  # 'http://[::1' and other hosts urlparse refuses: a post must not end the run
                host = ""
            if host and host not in SHORTENERS:
                return host
        return "<url>"

    def mention_replacement(self, handle: str) -> str:
        policy = self.settings.mentions
        return f"@{handle}" if policy == "keep" else "" if policy == "remove" else "@user"

    def clean(self, post: Post) -> Cleaned:
        """The cleaned text of a post, with counts of links and personal data found."""
        text, links = self._apply_entities(post)
        # Cheap membership tests first: most short posts have no entity, URL, address or digit at all.
        if "&" in text:
            text = html.unescape(text)
        if not text.isascii():
            text = unicodedata.normalize("NFC", text)
            text = CONTROL_RE.sub("", text)
        elif not text.isprintable():
            text = CONTROL_RE.sub("", text)
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if "<|" in text:
            text = SPECIAL_TOKEN_RE.sub("", text)

        def on_url(match: re.Match) -> str:
            nonlocal links
            links += 1
            return self.url_replacement(match.group(0).rstrip(".,;:!?)")) + _trailing(match.group(0))

        lowered = text.lower()
        if "http" in lowered or "www." in lowered:
            text = URL_RE.sub(on_url, text)
        text, scrubbed = self._scrub(text)
        if self.settings.mentions != "keep" and "@" in text:
            text = MENTION_RE.sub(lambda m: self.mention_replacement(m.group(1)), text)
        if self.settings.strip_reply_mentions and post.in_reply_to_id:
            text = LEADING_MENTIONS_RE.sub("", text)
        text = SPACES_RE.sub(" ", text)
        text = BLANK_LINES_RE.sub("\n", text).strip()
        return Cleaned(text, links, scrubbed)

    def _apply_entities(self, post: Post) -> tuple[str, int]:
        """Replace the payload's mention and URL spans, when their offsets really point at them."""
        text = post.text
        spans = []
        for start, end, handle in post.mentions:
            if 0 <= start < end <= len(text) and text[start:end].lower() == f"@{handle}".lower():
                spans.append((start, end, self.mention_replacement(handle), 0))
        for start, end, url in post.urls:
            if 0 <= start < end <= len(text) and text[start:end].lower().startswith(("http", "www.")):
                spans.append((start, end, self.url_replacement(url), 1))
        if not spans:
            return text, 0
        spans.sort()
        pieces, cursor, links = [], 0, 0
        for start, end, replacement, is_link in spans:
            if start < cursor:  # overlapping entities: keep the first
                continue
            pieces.append(text[cursor:start])
            pieces.append(replacement)
            links += is_link
            cursor = end
        pieces.append(text[cursor:])
        return "".join(pieces), links

    def _scrub(self, text: str) -> tuple[str, int]:
        text, count = self.pii.scrub(text)
        for pattern, placeholder in self.extra:
            text, found = pattern.subn(lambda _, placeholder=placeholder: placeholder, text)  # no \1 templates
            count += found
        return text, count


def _trailing(url: str) -> str:
    """Punctuation a URL regex swallowed from the sentence around it, given back."""
    stripped = url.rstrip(".,;:!?)")
    return url[len(stripped):]
