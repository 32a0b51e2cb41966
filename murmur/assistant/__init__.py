"""The in-app assistant: answers grounded in the post index with citations, and replies to @mentions
(docs/assistant.md).

- `grounding`: the posts retrieved for a conversation's latest turn, shown to the model in a system block;
- `citations`: which of those posts a reply cites, and where (OpenAI's `url_citation` annotations);
- `thread`, `mentions`: a mention's thread rebuilt from the index, whether to answer, the reply post;
- `follow`: `murmur assistant --follow`, mentions from a stream file answered into a replies file;
- `service`: what they share (the index, the settings, the per-author rate limit).
"""
