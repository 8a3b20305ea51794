"""The one error of the studies: inputs the corruption, the metrics or the join of stage outputs cannot use."""

from __future__ import annotations

from ..errors import UserError


class NoiseError(UserError, ValueError):
    pass
