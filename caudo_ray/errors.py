"""Errors that name the file, case or key at fault."""


class DataError(ValueError):
    """An input file or case is unusable.

    Args:
        source: the file path or case id at fault.
        problem: what is wrong with it, in words a user can act on.
    """

    def __init__(self, source: str, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class StoreError(RuntimeError):
    """A pseudo-label store cannot be opened or written as asked (schema, config hash, lock)."""
