"""What every config section shares: unknown fields are errors, and one error type names the file and field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from ..errors import UserError

# lambda(k) schedules of the forgetting weight; forgetting_ray.losses implements each name.
LambdaSchedule = Literal["linear", "linear_offset", "constant", "cosine"]


class ConfigError(UserError, ValueError):
    """A configuration problem, with the file and the dotted field path in the message."""


class Section(BaseModel):
    """Base for every config section: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
