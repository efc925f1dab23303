"""The one exception family. The CLI turns each into a one-line message and an exit code."""

from __future__ import annotations


class DeployError(Exception):
    """Base of every error a user can cause or fix; never shown with a traceback."""

    exit_code = 1


class ConfigError(DeployError):
    exit_code = 2


class InputError(DeployError):
    """A model, data set or calibration input that cannot be used."""

    exit_code = 2


class ConversionMismatch(DeployError):
    """A converted artifact disagrees with its parent beyond tolerance."""

    exit_code = 3


class AccuracyGateError(DeployError):
    """A build over its accuracy budget. `report` is what the failing stage measured (candidates, drops,
    intervals), which the build keeps beside the FP32 model so the evidence outlives the stage's work folder."""

    exit_code = 4

    def __init__(self, message: str, stage: str | None = None, report: dict | None = None):
        super().__init__(message)
        self.stage, self.report = stage, report


class ToolchainMissing(DeployError):
    exit_code = 5


class DeviceError(DeployError):
    """A device job that could not run or did not finish: unreachable, runtime missing, runner failed."""

    exit_code = 6


class DeviceTimeout(DeviceError):
    """The device job ran past its time limit; distinct from a failed measurement."""

    exit_code = 7


class IntegrityError(DeployError):
    """A bundle whose files do not match its manifest (tampered, truncated or damaged)."""

    exit_code = 8
