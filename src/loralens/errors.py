"""Error types of loralens. Imports nothing, so every layer can raise them.

Every error a user can cause is a :class:`LoralensError`; the CLI turns it into one line
on stderr and exit code 2. Messages name the file, key, layer and shapes, and the fix, in the words of the
Python API (never a command-line flag). When the fix is to change an argument, ``option`` names that
parameter as the Python keyword (``"base"``, ``"modules"``, ``"max_memory"``, ...): the CLI maps it to its
flag in one table (``loralens.cli._app.OPTION_ADVICE``), so library and CLI each speak their own terms.
A :class:`LoralensWarning` marks a result computed with a caveat (e.g. a near-singular base weight
solved by least squares); the CLI shows it as one ``warning:`` line and still exits 0.
"""

#: What ``option`` takes: the parameter the fix concerns, several (``("dtype", "modules")``), or None.
Option = str | tuple[str, ...] | None


def _options(option: Option) -> tuple[str, ...]:
    return (option,) if isinstance(option, str) else tuple(option or ())


class LoralensError(ValueError):
    """Base class: bad input a user can fix.

    ``option``: the Python keyword of the parameter the fix concerns (e.g. ``"replace"`` for an output folder
    that exists), a tuple of them when the fix concerns several, or None; :attr:`options` always gives a tuple.
    The message is ``str(error)`` as for any exception; ``option`` survives pickling (it is in ``__dict__``).
    """

    def __init__(self, *args: object, option: Option = None) -> None:
        super().__init__(*args)
        self.option = option

    @property
    def options(self) -> tuple[str, ...]:
        """``option`` as a tuple: empty when None."""
        return _options(self.option)


class InputPathError(LoralensError):
    """A path is missing, of the wrong kind, or cannot be resolved."""


class OutputExistsError(InputPathError):
    """The output folder exists and may not be replaced."""


class OutputPathError(InputPathError):
    """The output path cannot take the results (a file, a dangling link, an input of the same run)."""


class CheckpointError(LoralensError):
    """A checkpoint or config file is corrupt, truncated, unsafe or of an unknown format."""


class ShapeError(LoralensError):
    """Tensors do not have the shapes the computation needs (e.g. an adapter for another base)."""


class ModelMismatchError(LoralensError):
    """An adapter does not fit the base model it is analysed with."""


class DTypeError(LoralensError):
    """A dtype the computation cannot use (half-precision solves, integer or quantized weights)."""


class UnsupportedAdapterError(LoralensError):
    """An adapter feature that an analysis cannot honour (e.g. DoRA's update where ``s B A`` is assumed)."""


class NonFiniteError(LoralensError):
    """A tensor holds NaN or Inf."""


class BatchError(LoralensError):
    """A problem with some matrices of a stacked batch.

    ``indices`` are the positions in the batch (not model layer numbers); callers that know the
    layer numbers re-raise with them.
    """

    def __init__(self, message: str, indices: tuple[int, ...] = (), *, option: Option = None) -> None:
        super().__init__(message, option=option)
        self.indices = indices


class SingularMatrixError(BatchError):
    """A base weight is singular to working precision, so its conversion matrices are undefined."""


class RankError(BatchError):
    """A subspace dimension i or j exceeds the numerical rank, so phi would use arbitrary vectors."""


class LoralensWarning(UserWarning):
    """Base class of loralens's warnings: the results were computed, with a caveat the user must see.

    The CLI shows each as one ``warning:`` line on stderr; the exit code stays 0. ``option`` as for
    :class:`LoralensError` (warn with an instance, ``warnings.warn(NearSingularWarning(message, option="dtype"))``,
    to set it).
    """

    def __init__(self, *args: object, option: Option = None) -> None:
        super().__init__(*args)
        self.option = option

    @property
    def options(self) -> tuple[str, ...]:
        """``option`` as a tuple: empty when None."""
        return _options(self.option)


class NearSingularWarning(LoralensWarning):
    """A base weight is near-singular to working precision: its layers were solved by least squares instead."""


class FanInFanOutWarning(LoralensWarning):
    """``fan_in_fan_out`` in adapter_config.json contradicts how the base stores the weight; PEFT's rule was used."""


class DoraProductWarning(LoralensWarning):
    """A DoRA adapter's ``B A`` was analysed: the product of its factors, not its update (which DoRA rescales)."""


class AdapterConfigWarning(LoralensWarning):
    """``adapter_config.json`` raises a suspicion about the analysed update: its scaling (rsLoRA or alpha / r, a
    missing or default ``lora_alpha``), a base weight that the initialisation modified (PiSSA, OLoRA, ...), or DoRA
    without magnitude vectors. A heuristic: the numbers were computed as the config says."""


class UnanalysedTensorsWarning(LoralensWarning):
    """An adapter holds tensors that loralens leaves out (LoRA factors of modules outside the numbered layers,
    modules saved in full through ``modules_to_save``, other tensors): the analyses cover the rest."""
