"""Settings of the data curation stage (`murmur data`). Defaults are made for short posts, not web pages."""

from pydantic import Field, field_validator

from murmur.settings.base import Section

FORMATS = ("x-api", "x-archive", "jsonl", "csv", "parquet", "text", "chitchat")
PII_KINDS = ("email", "phone", "card", "ip", "iban", "ssn", "name")  # murmur.data.pii finds them


class DataSettings(Section):
    """Where posts come from and how they are curated."""

    sources: list[str] = Field(default_factory=list,
                               description="FORMAT:PATH entries (PATH may be a glob), e.g. 'x-api:posts/*.json.gz'; "
                                           "'chitchat:' is the demo corpus of the chitchat-dataset package")
    deletions: str | None = Field(None, description="deletion list: one 'post:ID', 'account:ID' or bare post id a line")
    executor: str = Field("local", description="local (processes on this machine) or ray")
    address: str | None = Field(None, description="Ray cluster address; default starts a local Ray instance")
    workers: int = Field(0, ge=0, description="worker processes (local) or CPUs (local Ray); 0 = all cores")
    batch_size: int = Field(4096, ge=1, description="records per batch: bounds memory, unit of parallel work")
    split_bytes: int = Field(64 << 20, ge=1 << 10, description="ray: plain jsonl/text files larger than this are "
                                                                 "read by several workers, in ranges of this size")
    partitions: int = Field(0, ge=0, description="ray: partitions of the global step's shuffles; 0 = one per "
                                                 "50,000 posts, at least one per CPU")

    # Reading
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="jsonl/csv/parquet column mapping, Post field -> column, e.g. {text='body', author_id='user'}")
    archive_author_id: str | None = Field(None, description="author id for an X archive (default: read account.js "
                                                            "next to tweets.js, else the folder name)")
    max_record_bytes: int = Field(65536, ge=1, description="records larger than this are quarantined")
    # At most 256: the parser and the readers recurse once per level, and Python's stack allows about 1000.
    max_json_depth: int = Field(64, ge=1, le=256, description="JSON nested deeper than this is quarantined "
                                                              "(too_deep); an X API payload is about 8 deep")
    quarantine_snippet_chars: int = Field(200, ge=0, description="how much of a bad record quarantine.parquet keeps")

    # Cleaning
    mentions: str = Field("placeholder", description="@mentions: keep | placeholder (@user) | remove")
    urls: str = Field("domain", description="URLs: keep | domain (host only) | placeholder (<url>) | remove")
    strip_reply_mentions: bool = Field(True, description="drop the @handles X prepends to a reply")
    scrub: list[str] = Field(default_factory=lambda: ["email", "phone", "card", "ip", "iban", "ssn"],
                             description="personal data to replace by a typed placeholder such as <email>: "
                                         "email, phone, card, ip, iban, ssn, and name (needs murmur[pii])")
    phone_regions: list[str] = Field(default_factory=lambda: ["US", "GB", "CA", "AU", "IE", "NZ"],
                                     description="regions whose national phone numbers (020 7946 0958) are "
                                                 "recognised; numbers written with +CC are, whatever the regions")
    phone_max_runs: int = Field(32, ge=0, description="runs of 7+ digits read as possible phone numbers per text; "
                                                    "later runs are scrubbed as <phone> unread (bounds the work)")
    name_min_score: float = Field(0.5, ge=0, le=1, description="Presidio confidence needed to replace a name")
    scrub_patterns: dict[str, str] = Field(default_factory=dict,
                                           description="extra name -> regex; matches become <name>")

    # Filters
    min_chars: int = Field(2, ge=0, description="shortest post kept, in characters after cleaning")
    max_chars: int = Field(2000, ge=1, description="longest post kept (a tweet is 280, a long note more)")
    languages: list[str] = Field(default_factory=lambda: ["en"], description="languages kept; empty = all")
    lang_min_chars: int = Field(20, ge=0, description="shorter texts are too short to detect; they pass")
    lang_confidence: float = Field(0.9, ge=0, le=1, description="detector confidence needed to drop a post")
    max_hashtags: int = Field(5, ge=0, description="more hashtags than this is hashtag stuffing")
    max_char_run: int = Field(12, ge=2, description="a character repeated this many times in a row is spam")
    max_author_repeats: int = Field(3, ge=1, description="an author posting one text more often than this is spam")

    # Dedup
    dedup_min_chars: int = Field(20, ge=0, description="shorter texts ('lol', 'thanks!') are exempt from dedup, "
                                                       "author-repeat spam and deleted-copy removal")
    shingle_chars: int = Field(5, ge=1, description="MinHash shingle size in characters")
    minhash_bands: int = Field(16, ge=1, description="LSH bands")
    minhash_rows: int = Field(8, ge=1, description="rows per band (bands*rows permutations)")
    near_dedup: bool = True
    seed: int = 0

    # Threads and split
    min_turns: int = Field(2, ge=1, description="shortest conversation kept, in turns")
    max_turns: int = Field(32, ge=2, description="longest conversation: deeper paths are cut")
    max_paths_per_tree: int = Field(64, ge=1, description="conversations taken from one reply tree at most")
    validation_fraction: float = Field(0.05, ge=0, lt=1)
    test_fraction: float = Field(0.05, ge=0, lt=1)

    # Canaries for the privacy probe of the eval stage
    canaries: int = Field(0, ge=0, description="secret strings planted in the train split (0 = none)")
    canary_repeats: list[int] = Field(default_factory=lambda: [10, 1, 0],
                                      description="times each canary is planted, cycled over canaries; "
                                                  "0 = a control never inserted")

    @field_validator("executor")
    @classmethod
    def _executor(cls, value: str) -> str:
        if value not in ("local", "ray"):
            raise ValueError("must be 'local' or 'ray'")
        return value

    @field_validator("mentions")
    @classmethod
    def _mentions(cls, value: str) -> str:
        if value not in ("keep", "placeholder", "remove"):
            raise ValueError("must be keep, placeholder or remove")
        return value

    @field_validator("urls")
    @classmethod
    def _urls(cls, value: str) -> str:
        if value not in ("keep", "domain", "placeholder", "remove"):
            raise ValueError("must be keep, domain, placeholder or remove")
        return value

    @field_validator("scrub")
    @classmethod
    def _scrub(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(PII_KINDS))
        if unknown:
            raise ValueError(f"unknown kinds {unknown}: use {', '.join(PII_KINDS)} or add scrub_patterns")
        return value

    @field_validator("phone_regions")
    @classmethod
    def _phone_regions(cls, value: list[str]) -> list[str]:
        import phonenumbers

        regions = [region.upper() for region in value]
        unknown = sorted(set(regions) - phonenumbers.SUPPORTED_REGIONS)
        if unknown:
            raise ValueError(f"unknown regions {unknown}: use two-letter ISO 3166 codes such as US, GB, FR")
        return regions

    @field_validator("canary_repeats")
    @classmethod
    def _repeats(cls, value: list[int]) -> list[int]:
        if not value or any(v < 0 for v in value):
            raise ValueError("must be a non-empty list of counts >= 0")
        return value
