"""The one exception family tiersim raises for bad input; the CLI prints it as one line."""


class TiersimError(ValueError):
    """Bad input or a file tiersim refuses; the message names what was wrong and what is accepted."""


class SpecError(TiersimError):
    """A model config or hardware profile that cannot be used."""


class TraceError(TiersimError):
    """A trace file that is missing, truncated, corrupted or of another version."""


class PolicyError(TiersimError):
    """A policy configuration or policy input outside what the method defines."""


class ConfigError(TiersimError):
    """A configuration field outside what is accepted; `field` names it so the CLI can name the flag."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
