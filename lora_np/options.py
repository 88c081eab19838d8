"""Rules for numeric options, shared by the command line (argparse types, checked at parse
time) and the Python API (TrainArgs, generate, evaluate), so both refuse the same values
with a message that names the option.

    STEPS = Int(min=1)
    p.add_argument("--steps", type=STEPS.argtype("--steps"))    # argparse: exit 2, names --steps
    STEPS.check("steps", args.steps)                             # API: OptionError names steps
"""
import argparse
import math
import operator

__all__ = ["OptionError", "Int", "Float"]


class OptionError(ValueError):
    """An option value outside what it may be; the message names the option."""


class _Rule:
    kind = ""

    def __init__(self, min=None, max=None, min_open=False, max_open=False, none_ok=False):
        self.min, self.max, self.min_open, self.max_open, self.none_ok = min, max, min_open, max_open, none_ok

    def describe(self):
        lo = None if self.min is None else f"{'>' if self.min_open else '>='} {self.min}"
        hi = None if self.max is None else f"{'<' if self.max_open else '<='} {self.max}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        return f"{self.kind}" + (f" {bounds}" if bounds else "")

    def _convert(self, value):
        raise NotImplementedError

    def check(self, name, value):
        """value converted to the rule's type, or OptionError naming `name`."""
        if value is None and self.none_ok:
            return None
        try:
            v = self._convert(value)
        except (TypeError, ValueError):
            raise OptionError(f"{name} must be {self.describe()}, got {value!r}") from None
        if (self.min is not None and (v < self.min or (self.min_open and v == self.min))) or \
                (self.max is not None and (v > self.max or (self.max_open and v == self.max))):
            raise OptionError(f"{name} must be {self.describe()}, got {value!r}")
        return v

    def argtype(self, option):
        """An argparse `type=` callable: argparse reports its error as a usage error naming `option`."""
        def parse(text):
            try:
                return self.check(option, self._parse(text))
            except OptionError as e:
                raise argparse.ArgumentTypeError(str(e).replace(f"{option} ", "", 1)) from None
            except (TypeError, ValueError):
                raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
        parse.__name__ = self.kind  # argparse's "invalid <name> value" fallback
        return parse


class Int(_Rule):
    """An integer (bool refused) within [min, max]."""
    kind = "an integer"

    def _convert(self, value):
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)  # int and NumPy integers; floats and strings raise TypeError

    def _parse(self, text):
        return int(text)


class Float(_Rule):
    """A finite number (bool refused) within the bounds; min_open / max_open exclude them."""
    kind = "a finite number"

    def _convert(self, value):
        if isinstance(value, (bool, str, bytes)):
            raise TypeError
        v = float(value)
        if not math.isfinite(v):
            raise ValueError
        return v

    def _parse(self, text):
        return float(text)
