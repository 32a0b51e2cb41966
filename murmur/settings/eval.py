"""Settings of the evaluation stage (`murmur eval`)."""

from murmur.settings.base import Section


class EvalSettings(Section):
    """What to measure after training."""

    seed: int = 0
