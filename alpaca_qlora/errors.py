"""Errors that mean bad input or setup, not a bug: stages print their message (which says what to do), no trace."""


class PipelineError(Exception):
    """Base for errors whose message is meant for the user."""


class ConfigError(PipelineError, ValueError):
    """A parameter is missing, unknown or out of range; the message names it and says what is allowed."""
