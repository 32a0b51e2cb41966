"""Errors a user can cause. The CLI prints them as one line, without a traceback."""


class MurmurError(Exception):
    """A failure Murmur can explain: bad file, bad setting, bad request. Exit code 1."""


class SettingsError(MurmurError):
    """A recipe or override that does not validate. Names the key and what is allowed."""


class RequestError(MurmurError):
    """A request that cannot be served as asked (a prompt too long for the context, say).

    `param` names what to change ("prompt", "max_tokens") and `code` says why, in OpenAI's words
    ("context_length_exceeded", "invalid_value"), so an API can answer it without rewording it.
    """

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param = param
        self.code = code
