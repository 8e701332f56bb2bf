"""Exceptions with messages meant for people: each names the file (and line) and what is wrong."""


class SpeakerlabError(Exception):
    """Base class: command-line entry points print these without a traceback."""


class AudioError(SpeakerlabError):
    """Audio that cannot be used: unreadable, empty, wrong rate, too short."""


class DataError(SpeakerlabError):
    """A data directory, list or trial file that is missing or malformed."""


class CheckpointError(SpeakerlabError):
    """A checkpoint that cannot be read or does not fit the model."""


class ConfigError(SpeakerlabError):
    """A configuration or environment that cannot work (options, ranks, devices)."""
