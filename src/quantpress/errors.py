"""Errors quantpress raises. Library code raises these; only the CLI turns them into exit codes."""

from __future__ import annotations


class QuantpressError(Exception):
    """Base class: something the user can act on, with a message that says what."""


class ConfigError(QuantpressError):
    """A quantization or calibration setting is invalid."""


class UnsupportedArchitecture(QuantpressError):
    """The model's architecture is not in quantpress's architecture table."""


class CheckpointError(QuantpressError):
    """A model folder or weight file is missing, truncated, corrupt or inconsistent."""


class CalibrationError(QuantpressError):
    """The calibration or evaluation text cannot provide what was asked for."""


class NonFiniteError(QuantpressError):
    """A weight or activation contains NaN or Inf."""


class HessianNotPositiveDefinite(QuantpressError):
    """Cholesky failed even after damping was increased; names where it happened when known."""

    def __init__(self, message: str, *, damp_percent: float | None = None) -> None:
        super().__init__(message)
        self.damp_percent = damp_percent


class OutputExistsError(QuantpressError):
    """The output folder already holds a finished model."""


class PromptTooLong(QuantpressError):
    """A prompt plus the requested new tokens exceed what the model allows."""


class DownloadError(QuantpressError):
    """A release could not be fetched, or what arrived does not match the source's checksums."""


class TemplateError(QuantpressError):
    """A conversation cannot be rendered in the chosen prompt format (roles out of order, a chat
    template that raises or does not parse)."""


class Overloaded(QuantpressError):
    """The server already holds as many requests (waiting or running) as it accepts; retry later."""


class GenerationFailed(QuantpressError):
    """Generation stopped inside the engine (a model error, or the server shutting down)."""
