"""User-facing errors: one line that names the input and says what to do."""


class InputError(ValueError):
    """Bad input from the user (file, prompt, option). The CLI prints it and exits with 2."""


class Cancelled(RuntimeError):
    """The user cancelled long work; nothing partial was written."""
