"""The base every settings section derives from: unknown keys are errors, assignment validates."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A typed block of settings. Unknown keys are refused so that typos never pass silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
