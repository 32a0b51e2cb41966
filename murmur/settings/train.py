"""Settings of the training stage (`murmur train`)."""

from pydantic import Field

from murmur.settings.base import Section


class TrainSettings(Section):
    """Optimisation, batch, schedule, parallelism and checkpointing."""

    lr: float = Field(3e-3, gt=0)
    seed: int = 0
