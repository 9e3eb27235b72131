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


class ModelFileError(DataError):
    """A model or checkpoint file is refused: unreadable, truncated, not caudo-ray's weights, or carrying code.

    Weights are loaded as data only (``torch.load(weights_only=True)``), so a file that would need to run code to
    load is refused rather than executed.
    """
