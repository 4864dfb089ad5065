"""The console's one error type: something the person at the console must be told."""


class ConsoleError(Exception):
    """An expected refusal or failure; the message says what happened and that nothing changed."""
