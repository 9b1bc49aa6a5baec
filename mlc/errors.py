"""The one error family mlc raises for problems the user can fix."""

from __future__ import annotations


class MlcError(Exception):
    """An error with a one-line message and a hint that says what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message.rstrip(".")
        return f"{text}. {self.hint}" if self.hint else text


class MlcUsageError(MlcError):
    """Bad command-line usage (wrong option, bad value): exit code 2 like click's own usage errors."""

    exit_code = 2


class InputError(MlcError):
    """A file or directory given by the user is missing, malformed or of the wrong kind."""


class ValidationError(MlcError):
    """Several problems found while checking inputs before any work started."""

    def __init__(self, problems: list[str], what: str = "input", hint: str | None = None):
        self.problems = problems
        first = problems[0] if len(problems) == 1 else f"{len(problems)} problems with the {what}"
        super().__init__(first, hint)

    def one_line(self) -> str:
        if len(self.problems) == 1:
            return super().one_line()
        lines = [super().one_line()] + [f"  - {p}" for p in self.problems]
        return "\n".join(lines)
