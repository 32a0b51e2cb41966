"""Errors a user can cause. The CLI prints them as one line, without a traceback."""


class MurmurError(Exception):
    """A failure Murmur can explain: bad file, bad setting, bad request. Exit code 1."""


class SettingsError(MurmurError):
    """A recipe or override that does not validate. Names the key and what is allowed."""
