"""Settings of the in-app assistant (`[serve.assistant]`): grounding chat in the post index, citing posts, and
answering @mentions (docs/assistant.md)."""

from pydantic import Field, field_validator

from murmur.settings.base import Section


class AssistantSettings(Section):
    """How the server grounds answers in the post index and answers mentions."""

    retrieval: bool = Field(True, description="ground chat answers in the post index when the server has one "
                            "(a request may turn it off with \"retrieval\": false)")
    citation_url: str = Field("https://example.social/post/{id}", max_length=512,
                              description="a cited post's url; {id} is replaced by the post's id (url-quoted)")
    post_chars: int = Field(500, ge=16, le=10_000, description="characters of each retrieved post shown to the "
                            "model (longer posts are cut)")
    title_words: int = Field(8, ge=1, le=64, description="words of a post in its citation's title")
    min_overlap_words: int = Field(4, ge=2, le=64, description="for a reply without [id] markers: consecutive "
                                   "words shared with a retrieved post that make a citation")

    # Mentions
    handle: str | None = Field(None, pattern=r"^@?\w{1,30}$", description="the assistant's handle; a post "
                               "mentioning @handle is a mention")
    user_id: str | None = Field(None, max_length=256, description="the assistant's account id: its own posts "
                                "are never answered (no reply loops)")
    reply_chars: int = Field(280, ge=16, le=25_000, description="longest reply post, in characters")
    reply_max_tokens: int = Field(96, ge=1, le=4096, description="tokens generated for a reply post")
    temperature: float = Field(0.7, ge=0, le=2, description="sampling temperature of reply posts")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus of reply posts")
    thread_posts: int = Field(20, ge=1, le=200, description="posts of the thread (the latest) given to the model")
    replies_per_author: int = Field(5, ge=0, description="replies one author may get per window; 0 = no limit")
    rate_window_s: float = Field(3600.0, gt=0, description="the window of replies_per_author, in seconds")
    max_authors: int = Field(100_000, ge=1, description="authors the rate limiter remembers (least recently "
                             "seen forgotten first)")

    @field_validator("citation_url")
    @classmethod
    def _one_id_field(cls, value: str) -> str:
        if "{id}" not in value:
            raise ValueError("the citation url needs {id} where the post's id goes, e.g. "
                             "https://example.social/post/{id}")
        if not value.startswith(("https://", "http://", "/")):
            raise ValueError("the citation url is an http(s) url or a path starting with /")
        return value

    @field_validator("handle")
    @classmethod
    def _bare_handle(cls, value: str | None) -> str | None:
        return value.removeprefix("@") if value else value
